-- A popped entry whose queue has no consumer any more (cancelled while the pop's reply was on
-- its way): out of its in-flight list and back to the head (the right end) of its queue, in
-- one step. 0, and nothing written, when it is no longer in flight.
-- KEYS: the in-flight list, the queue key. ARGV: the entry.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
