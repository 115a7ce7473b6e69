-- Pop up to ARGV[1] messages from the queue lists and record each as unacknowledged, in one
-- atomic step, as kombu's QoS.append would: unacked hash entry [message, exchange, routing
-- key] (KEYS[1]) and delivery time ARGV[2] in the unacked index (KEYS[2]). KEYS[3..] are the
-- queue lists, in the order they are served. Returns {queue number, tag, message}... A message
-- without a readable delivery tag is returned unrecorded (tag ''), for the worker to refuse.
local out = {}
local left = tonumber(ARGV[1])
for i = 3, #KEYS do
  if left <= 0 then break end
  local items = redis.call('RPOP', KEYS[i], left)
  if items then
    for _, item in ipairs(items) do
      local tag = ''
      local ok, m = pcall(cjson.decode, item)
      if ok and type(m) == 'table' and type(m.properties) == 'table'
          and type(m.properties.delivery_tag) == 'string' then
        tag = m.properties.delivery_tag
        local info = m.properties.delivery_info
        local ex, rk = '', ''
        if type(info) == 'table' then
          if type(info.exchange) == 'string' then ex = info.exchange end
          if type(info.routing_key) == 'string' then rk = info.routing_key end
        end
        redis.call('HSET', KEYS[1], tag,
                   '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
      end
      out[#out + 1] = i - 2
      out[#out + 1] = tag
      out[#out + 1] = item
      left = left - 1
    end
  end
end
return out
