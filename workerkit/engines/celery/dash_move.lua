-- A dashboard action on one exact list entry, fenced by the entry itself (dashboard.py): it
-- leaves KEYS[1] and, when KEYS[2] is given, ARGV[2] goes to KEYS[2] (ARGV[3] 'L': LPUSH, the
-- back of a kombu queue; else RPUSH, the end of a dead-letter list), in one step.
-- 0, and nothing written, when KEYS[1] no longer holds the entry (the page showed an old one).
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if #KEYS > 1 then
  if ARGV[3] == 'L' then
    redis.call('LPUSH', KEYS[2], ARGV[2])
  else
    redis.call('RPUSH', KEYS[2], ARGV[2])
  end
end
return 1
