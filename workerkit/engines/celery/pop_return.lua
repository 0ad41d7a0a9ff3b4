-- In-flight entries back to the head (the right end) of their queues, oldest nearest the head.
-- KEYS[1]: the registry hash, KEYS[2]: the owner's liveness key, then pairs: an in-flight
-- list, its queue key. ARGV[1]: 'own' (the owner itself) or 'dead' (only while the owner's
-- liveness key is gone; the lists leave the registry). Returns how many entries moved.
if ARGV[1] == 'dead' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local moved = 0
for i = 3, #KEYS, 2 do
  while redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT') do
    moved = moved + 1
  end
  if ARGV[1] == 'dead' then redis.call('HDEL', KEYS[1], KEYS[i]) end
end
return moved
