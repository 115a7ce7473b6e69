-- Store a task's result unless a SUCCESS is stored already, and publish it to the result's
-- channel. KEYS[1] result key; ARGV[1] encoded meta, ARGV[2] expiry in seconds (0: none).
-- A stored value that does not decode is overwritten, as Celery's own check would.
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
