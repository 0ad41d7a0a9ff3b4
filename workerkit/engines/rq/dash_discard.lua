-- Discard a failed (or stopped) job for good: its registry entry, hash, executions, results and
-- dependency sets.
-- After dash_version.lua. KEYS: job hash, failed registry, executions set, results stream,
-- dependents set, dependencies set. ARGV: job id, version, execution key prefix.
-- Returns as dash_retry.lua.
local version, status = version_of(KEYS[1])
if not version then return {-1, ''} end
if version ~= ARGV[2] then return {0, status} end
if status ~= 'failed' and status ~= 'stopped' then return {-2, status} end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return {0, status} end
for _, execution in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  redis.call('DEL', ARGV[3] .. execution)
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
return {1, 'deleted'}
