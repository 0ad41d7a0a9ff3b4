-- Write the job's meta (a checkpoint) only while the attempt runs.
-- KEYS: lease, job hash. ARGV: token, meta. Returns 1 when written.
if redis.call('GET', KEYS[1]) == 'run:' .. ARGV[1] then
  redis.call('HSET', KEYS[2], 'meta', ARGV[2])
  return 1
end
return 0
