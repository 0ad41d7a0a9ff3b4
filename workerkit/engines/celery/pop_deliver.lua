-- A popped entry becomes a delivery: out of its in-flight list and into kombu's unacked hash
-- and index with its lease, in one step. 0, and nothing written, when the entry is no longer
-- in flight (put back in its queue meanwhile: it is not this worker's to deliver) -- unless a
-- retry finds its own earlier write (the reply of that write was lost): then 1.
-- KEYS: the in-flight list, kombu's unacked_index, unacked hash, the lease.
-- ARGV: the entry, the delivery tag, the time, kombu's unacked record, the owner, the TTL (ms).
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 and redis.call('GET', KEYS[4]) == ARGV[5] then
    return 1
  end
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[6])
return 1
