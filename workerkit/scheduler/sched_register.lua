-- The leader's schedules now, fenced by its holder and epoch: fingerprints stored, others
-- marked removed. KEYS[1] the lease hash, KEYS[2] the set of known names; ARGV holder, epoch,
-- key prefix, then name, fingerprint pairs. Returns 1, or 0 when the lease is not this
-- holder's under this epoch (nothing written).
-- Paused flags stay as they are: pausing is an operator's decision, not the code's.
local cur = redis.call('HMGET', KEYS[1], 'holder', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
local given = {}
for i = 4, #ARGV, 2 do
  local name = ARGV[i]
  given[name] = true
  redis.call('SADD', KEYS[2], name)
  redis.call('HSET', ARGV[3] .. 'state:' .. name, 'fingerprint', ARGV[i + 1], 'removed', '0')
end
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not given[name] then
    redis.call('HSET', ARGV[3] .. 'state:' .. name, 'removed', '1')
    redis.call('HDEL', ARGV[3] .. 'state:' .. name, 'fingerprint')
  end
end
return 1
