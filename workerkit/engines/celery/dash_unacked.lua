-- What the dashboard's queue counts need of kombu's unacked hash, read on the server: for each
-- delivery, its tag, its routing key and its eta header ('' when none).
-- KEYS[1]: the unacked hash. ARGV[1]: the most deliveries read.
-- Returns the triples, flat; false when the hash holds more than ARGV[1] (counts unknown).
if redis.call('HLEN', KEYS[1]) > tonumber(ARGV[1]) then return false end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local ok, record = pcall(cjson.decode, all[i + 1])
  local key, eta = '', ''
  if ok and type(record) == 'table' then
    if type(record[3]) == 'string' then key = record[3] end
    local payload = record[1]
    if type(payload) == 'table' and type(payload.headers) == 'table'
        and type(payload.headers.eta) == 'string' then
      eta = payload.headers.eta
    end
  end
  out[#out + 1] = all[i]
  out[#out + 1] = key
  out[#out + 1] = eta
end
return out
