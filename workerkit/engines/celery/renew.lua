-- Renew this worker's leases, fenced: a lease is renewed only while its message is still
-- unacknowledged and the lease is this worker's or gone (expired, and nobody took the message:
-- every delivery sets its lease with its unacked entry). Returns the tags that are lost.
-- KEYS[1]: kombu's unacked hash; KEYS[2..n]: the lease keys. ARGV[1]: the owner, ARGV[2]: the
-- TTL in milliseconds, ARGV[3..]: the delivery tags, in the order of their lease keys.
local lost = {}
for i = 2, #KEYS do
  local tag = ARGV[i + 1]
  local holder = redis.call('GET', KEYS[i])
  if redis.call('HEXISTS', KEYS[1], tag) == 1 and ((not holder) or holder == ARGV[1]) then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
  else
    lost[#lost + 1] = tag
  end
end
return lost
