-- Pause, resume or trigger-now a known schedule (any process: the CLI).
-- KEYS[1] the set of known names, KEYS[2] its state hash or its trigger requests;
-- ARGV name, 'paused' and '1'/'0', or 'trigger' and the fire ms. Returns 1, or 0 when unknown.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'paused' then
  redis.call('HSET', KEYS[2], 'paused', ARGV[3])
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[3])
end
return 1
