-- The started members of one queue whose lease is gone (abandoned by a dead process).
-- KEYS: started set. ARGV: lease prefix. Returns the members.
local found = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local sep = string.find(member, ':[^:]*$')
  local job_id = string.sub(member, 1, sep - 1)
  local token = string.sub(member, sep + 1)
  local lease = redis.call('GET', ARGV[1] .. job_id)
  if not lease or string.sub(lease, -(#token + 1)) ~= ':' .. token then
    table.insert(found, member)
  end
end
return found
