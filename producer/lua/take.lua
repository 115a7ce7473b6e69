-- Pop up to ARGV[1] messages from the queue lists and record each as unacknowledged, in one
-- atomic step, as kombu's QoS.append would: unacked hash entry [message, exchange, routing
-- key] (KEYS[1]) and delivery time ARGV[2] in the unacked index (KEYS[2]). KEYS[3] is the
-- wake list of the worker's model queue, KEYS[4..] the queue lists in the order they are
-- served: the first ARGV[3] of them hold the soonest priority step, and from the others at
-- most ARGV[4] messages are taken (the room kept for the soonest step). ARGV[5..] say for each
-- queue list whether its messages are recorded ('1'; '0': a queue consumed without
-- acknowledgements, whose record nothing would ever drop). Returns {queue number,
-- tag, message}... A message without a readable delivery tag is returned unrecorded (tag ''),
-- for the worker to refuse. The wake list is left holding one entry while any list holds
-- messages, and removed once all are empty, so a worker waiting on it wakes exactly when
-- there may be something to take.
local out = {}
local left = tonumber(ARGV[1])
local urgent = tonumber(ARGV[3])
local later = tonumber(ARGV[4])
local first = 4
for i = first, #KEYS do
  local limit = left
  if i - first >= urgent and later < limit then limit = later end
  if left <= 0 then break end
  if limit > 0 then
    local items = redis.call('RPOP', KEYS[i], limit)
    if items then
      for _, item in ipairs(items) do
        local tag = ''
        local ok, m = pcall(cjson.decode, item)
        if ARGV[5 + i - first] ~= '1' then
          tag = ''
        elseif ok and type(m) == 'table' and type(m.properties) == 'table'
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
        out[#out + 1] = i - first + 1
        out[#out + 1] = tag
        out[#out + 1] = item
        left = left - 1
        if i - first >= urgent then later = later - 1 end
      end
    end
  end
end
local waiting = 0
for i = first, #KEYS do
  waiting = waiting + redis.call('LLEN', KEYS[i])
  if waiting > 0 then break end
end
if waiting == 0 then
  redis.call('DEL', KEYS[3])
else
  redis.call('LTRIM', KEYS[3], 0, 0)
end
return out
