-- The dashboard's cancel of a message a worker holds until its eta (dashboard.py): out of
-- kombu's unacked hash and index, its lease gone (the worker's next lease round finds it lost
-- and drops it unstarted, its eta timer cancelled), onto the dead-letter list, in one step.
-- 0, and nothing written, when the delivery is not the one the page showed.
-- KEYS: the unacked hash, the unacked index, the lease, the dead-letter list.
-- ARGV: the delivery tag, its exact unacked record, the dead-letter record.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('RPUSH', KEYS[4], ARGV[3])
return 1
