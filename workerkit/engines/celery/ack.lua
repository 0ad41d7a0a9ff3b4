-- The fenced ack: kombu's (ZREM unacked_index, HDEL unacked) and the lease's DEL, only while the
-- message is still in unacked and its lease is this worker's or gone. 0, and nothing written,
-- when another worker holds it, or when it was restored meanwhile (it is back in its queue, to
-- run again: this run is not what settles it).
-- KEYS: the lease, kombu's unacked hash, its unacked_index. ARGV: the owner, the delivery tag.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return 0 end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
