-- The fence functions, which ledger.py puts before each checkpoint script (*_checkpoint.lua, finish.lua).
-- KEYS[1]: the fence key. ARGV[1..3]: the attempt's generation "retries:gen:started_ms",
-- compared as numbers in that order. ARGV[4]: the keys' TTL in seconds.
local function stale(fence)
  if not fence then return false end
  local a, b, c = string.match(fence, '^(%d+):(%d+):(%d+)$')
  if not a then return false end
  local mine = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])}
  local theirs = {tonumber(a), tonumber(b), tonumber(c)}
  for i = 1, 3 do
    if theirs[i] ~= mine[i] then return theirs[i] > mine[i] end
  end
  return false
end
local function take()
  redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3], 'EX', ARGV[4])
end
