-- A popped entry kombu cannot read (poison.py): out of its in-flight list and onto its
-- queue's dead-letter list, in one step; 0, and nothing written, when it is no longer in flight.
-- KEYS: the in-flight list, the dead-letter list. ARGV: the entry, the dead-letter record.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
