"""The Lua scripts the limiter runs in Redis: each one atomic, the clock Redis's own (`TIME`),
so every worker process and node sees one window per key whatever its own clock says.

A window is two Redis keys: a sorted set of the permits charged to it (member: permit id,
score: the millisecond it was charged) and a hash of their tokens (permit id -> tokens,
plus `=total`, their sum). A permit counts against the window for WINDOW_MS after it was
charged; the script forgets older ones as it goes. Every key of one limiter shares the
Redis Cluster hash tag `{<key>}`, so one script may touch them all.

They live here as text rather than in .lua files so that the wheel carries them without
package data.
"""

from __future__ import annotations

from typing import Final

# KEYS[1]: the key's pause marker. Then, for window i: KEYS[2i] its permits (zset),
# KEYS[2i+1] its tokens (hash).
# ARGV: permit id, tokens to charge, window in ms, then for window i: its requests
# limit (0: none), its tokens limit (0: none).
# Returns {1, 0, 0, ""} once the permit is charged to every window; else nothing is
# charged and it returns {0, exact, tokens, why}: `exact`, the ms until the pause ends and
# every requests limit has room (a floor: nothing frees a request earlier); `tokens`, the
# ms until the tokens limits have room counting the charges as they stand (a settle that
# lowers a charge frees room earlier); `why`, what holds it most ("paused",
# "requests:<i>", "tokens:<i>").
ACQUIRE: Final = """
local function each_batch(list, step)
  for i = 1, #list, 1000 do step(unpack(list, i, math.min(i + 999, #list))) end
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local id, tokens, span = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local exact, estimate, why, why_tokens = 0, 0, '', ''

local paused = redis.call('PTTL', KEYS[1])
if paused > 0 then exact, why = paused, 'paused' end

local windows = (#KEYS - 1) / 2
for i = 1, windows do
  local permits, spent = KEYS[2 * i], KEYS[2 * i + 1]
  local most_requests, most_tokens = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local old = redis.call('ZRANGEBYSCORE', permits, '-inf', now - span)
  if #old > 0 then
    local freed = 0
    each_batch(old, function(...)
      for _, charged in ipairs(redis.call('HMGET', spent, ...)) do
        freed = freed + (tonumber(charged) or 0)
      end
      redis.call('HDEL', spent, ...)
    end)
    redis.call('ZREMRANGEBYSCORE', permits, '-inf', now - span)
    redis.call('HINCRBY', spent, '=total', -freed)
  end
  local count = redis.call('ZCARD', permits)
  if count == 0 then redis.call('DEL', spent) end
  if most_requests > 0 and count >= most_requests then
    -- room once the (count - limit + 1)th oldest permit has left the window
    local oldest = redis.call('ZRANGE', permits, count - most_requests,
                              count - most_requests, 'WITHSCORES')
    local wait = math.max(1, tonumber(oldest[2]) + span - now)
    if wait > exact then exact, why = wait, 'requests:' .. i end
  end
  if most_tokens > 0 and count > 0 then
    local over = tonumber(redis.call('HGET', spent, '=total') or '0') + tokens - most_tokens
    if over > 0 then
      -- room once the oldest permits holding `over` tokens have left the window
      local wait = span
      local entries = redis.call('ZRANGE', permits, 0, -1, 'WITHSCORES')
      local freed = 0
      for j = 1, #entries, 2 do
        freed = freed + (tonumber(redis.call('HGET', spent, entries[j])) or 0)
        if freed >= over then
          wait = math.max(1, tonumber(entries[j + 1]) + span - now)
          break
        end
      end
      if wait > estimate then estimate, why_tokens = wait, 'tokens:' .. i end
    end
  end
end

if exact > 0 or estimate > 0 then
  if estimate > exact then why = why_tokens end
  return {0, math.ceil(exact), math.ceil(estimate), why}
end
for i = 1, windows do
  local permits, spent = KEYS[2 * i], KEYS[2 * i + 1]
  redis.call('ZADD', permits, now, id)
  redis.call('HSET', spent, id, tokens)
  redis.call('HINCRBY', spent, '=total', tokens)
  redis.call('PEXPIRE', permits, span + 1000)
  redis.call('PEXPIRE', spent, span + 1000)
end
return {1, 0, 0, ''}
"""

# KEYS: the tokens hash of each window the permit was charged to.
# ARGV: permit id, the tokens it really used. A window that has forgotten the permit
# (it left the window) is left alone. Returns 1.
SETTLE: Final = """
local used = tonumber(ARGV[2])
for i = 1, #KEYS do
  local charged = redis.call('HGET', KEYS[i], ARGV[1])
  if charged then
    redis.call('HSET', KEYS[i], ARGV[1], used)
    redis.call('HINCRBY', KEYS[i], '=total', used - tonumber(charged))
  end
end
return 1
"""

# KEYS[1]: the key's pause marker. ARGV: ms to pause, why. A pause only ever grows: a
# shorter one than the marker's remaining time leaves it be. Returns the ms it now has.
PAUSE: Final = """
local ms = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < ms then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ms)
  return ms
end
return left
"""
