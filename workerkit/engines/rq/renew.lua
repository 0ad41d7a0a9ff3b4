-- Renew the lease while it is this attempt's, whatever its state.
-- KEYS: lease. ARGV: token, ttl ms. Returns 1 when renewed.
local lease = redis.call('GET', KEYS[1])
if lease and string.sub(lease, -(#ARGV[1] + 1)) == ':' .. ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
