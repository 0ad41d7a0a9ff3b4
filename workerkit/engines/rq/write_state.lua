-- Write workerkit's state of the job (a checkpoint) only while the attempt runs: the job hash's
-- 'workerkit' field (jobs.META_KEY), never the user's 'meta'.
-- KEYS: lease, job hash. ARGV: token, state (JSON). Returns 1 when written.
if redis.call('GET', KEYS[1]) == 'run:' .. ARGV[1] then
  redis.call('HSET', KEYS[2], 'workerkit', ARGV[2])
  return 1
end
return 0
