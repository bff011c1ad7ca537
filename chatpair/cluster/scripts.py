"""The cluster lobby's server-side Lua scripts: everything two nodes could race on.

Redis runs a script atomically (no other command runs in between), so a
waiter taken by one node's JOIN is gone before any other node's JOIN looks;
that is what makes "never paired twice" hold across nodes. Each script is
the shared :data:`PRELUDE` plus its own body, and is called with no KEYS and
``ARGV[1]`` = key prefix, ``ARGV[2]`` = the inbox streams' MAXLEN, then its
own arguments. Key names are built exactly like :class:`chatpair.cluster.names.Keys`
(all under one hash tag, see there). Errors a caller made come back as
``CALLER <message>``, a join from a node whose heartbeat lapsed as
``NODEGONE <message>``; :mod:`chatpair.cluster.lobby` turns them into
exceptions. Notifications to another node go into that node's inbox stream
as entries of the :mod:`chatpair.cluster.inbox` format (``q`` = 0: control
entries have no sequence number).

Client record states: ``waiting`` (in its room's queue), ``chatting`` (with
``partner``), ``idle`` (connected, between a pair's end and its next JOIN; its
NEXT exclusions still count).
"""

from __future__ import annotations

PRELUDE = r"""
local P, MAXLEN = ARGV[1], ARGV[2]
local NODES, ROOMS, EPOCH = P .. 'nodes', P .. 'rooms', P .. 'epoch'
local function K(kind, name) return P .. kind .. ':' .. name end
local function nodeof(cid) return string.match(cid, '^([^:]*)') end
local function alive(node) return redis.call('EXISTS', K('node', node)) == 1 end

local function notify(cid, source, kind, payload)
  redis.call('XADD', K('inbox', nodeof(cid)), 'MAXLEN', '~', MAXLEN, '*',
             't', cid, 's', source, 'q', '0', 'k', kind, 'p', payload)
end

local function room_ended(room)
  if redis.call('HINCRBY', ROOMS, room, -1) <= 0 then redis.call('HDEL', ROOMS, room) end
end

-- Forget a client that is not chatting: its queue place, its exclusions, its record.
local function forget(cid)
  local rec = redis.call('HMGET', K('c', cid), 'state', 'room', 'tok')
  if rec[1] == 'waiting' then redis.call('LREM', K('q', rec[2]), 1, cid) end
  if rec[3] then redis.call('DEL', K('s', rec[3])) end
  for _, other in ipairs(redis.call('SMEMBERS', K('x', cid))) do
    redis.call('SREM', K('x', other), cid)
  end
  redis.call('DEL', K('x', cid), K('c', cid))
  redis.call('SREM', K('nc', nodeof(cid)), cid)
end

-- End the pair cid is in, if any: both become idle. Returns the partner (or nil).
local function break_pair(cid)
  local rec = redis.call('HMGET', K('c', cid), 'state', 'partner', 'room')
  if rec[1] ~= 'chatting' then return nil end
  local p = rec[2]
  redis.call('HSET', K('c', cid), 'state', 'idle', 'partner', '')
  if redis.call('HGET', K('c', p), 'partner') == cid then
    redis.call('HSET', K('c', p), 'state', 'idle', 'partner', '')
  end
  room_ended(rec[3])
  return p
end

-- Every client of a dead node goes; partners elsewhere become idle and are told.
-- Returns {partner, gone, ...} for the partners whose node is alive.
local function purge(node)
  local told = {}
  for _, cid in ipairs(redis.call('SMEMBERS', K('nc', node))) do
    local p = break_pair(cid)
    if p and nodeof(p) ~= node then
      notify(p, cid, 'peer_left', 'disconnected')
      if alive(nodeof(p)) then told[#told + 1] = p; told[#told + 1] = cid end
    end
    forget(cid)
  end
  redis.call('DEL', K('nc', node), K('inbox', node))
  return told
end

local function pair(w, cid, name, room)
  redis.call('LREM', K('q', room), 1, w)
  redis.call('HSET', K('c', w), 'state', 'chatting', 'partner', cid)
  redis.call('HSET', K('c', cid), 'state', 'chatting', 'partner', w, 'room', room, 'name', name)
  redis.call('SADD', K('nc', nodeof(cid)), cid)
  redis.call('HINCRBY', ROOMS, room, 1)
  if nodeof(w) ~= nodeof(cid) then notify(w, cid, 'paired', name) end
end

-- The first waiter of room cid may be paired with: not cid, not excluded, not
-- away; waiters whose node is dead are purged on the way. Returns w (or nil), ghosts.
local function first_waiter(cid, room)
  local q = K('q', room)
  local live = {[nodeof(cid)] = true}
  local ghosts = {}
  local start = 0
  while true do
    local batch = redis.call('LRANGE', q, start, start + 99)
    if #batch == 0 then return nil, ghosts end
    local gone = 0
    for _, w in ipairs(batch) do
      local wn = nodeof(w)
      if live[wn] == nil then live[wn] = alive(wn) end
      if not live[wn] then
        forget(w)
        ghosts[#ghosts + 1] = w
        gone = gone + 1
      elseif w ~= cid and redis.call('SISMEMBER', K('x', cid), w) == 0
          and redis.call('HGET', K('c', w), 'away') ~= '1' then
        return w, ghosts
      end
    end
    start = start + #batch - gone
  end
end

-- The pairing rule (chatpair/server/lobby.py Lobby.join), skipping and purging
-- waiters whose node is dead. Returns {status, waiter, waiter_name, ghosts}.
local function join(cid, name, room, requeued)
  local state = redis.call('HGET', K('c', cid), 'state')
  if state == 'waiting' or state == 'chatting' then
    return redis.error_reply('CALLER client ' .. cid .. ' is already in the lobby')
  end
  local w, ghosts = first_waiter(cid, room)
  if w then
    local wname = redis.call('HGET', K('c', w), 'name') or ''
    pair(w, cid, name, room)
    return {'matched', w, wname, ghosts}
  end
  if room ~= '*' and not requeued and tonumber(redis.call('HGET', ROOMS, room) or '0') > 0 then
    return {'room_full', '', '', ghosts}
  end
  redis.call('RPUSH', K('q', room), cid)
  redis.call('HSET', K('c', cid), 'state', 'waiting', 'partner', '', 'room', room, 'name', name)
  redis.call('SADD', K('nc', nodeof(cid)), cid)
  return {'queued', '', '', ghosts}
end
"""

#: ARGV[3..6] = cid, name, room token, requeued ('1'/'0').
JOIN = PRELUDE + r"""
local cid = ARGV[3]
if not alive(nodeof(cid)) then
  return redis.error_reply('NODEGONE node ' .. nodeof(cid) .. ' is not registered (heartbeat lapsed)')
end
return join(cid, ARGV[4], ARGV[5], ARGV[6] == '1')
"""

#: ARGV[3..7] = a, b, next_by or '', leaver or '', reason. Returns 1, or 0 if a and b were no longer a pair.
UNPAIR = PRELUDE + r"""
local a, b, next_by, leaver, reason = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if next_by ~= '' and next_by ~= a and next_by ~= b then
  return redis.error_reply('CALLER next_by=' .. next_by .. ' is neither ' .. a .. ' nor ' .. b)
end
local rec = redis.call('HMGET', K('c', a), 'state', 'partner')
if rec[1] ~= 'chatting' or rec[2] ~= b then return 0 end
break_pair(a)
if next_by ~= '' and redis.call('EXISTS', K('c', b)) == 1 then
  redis.call('SADD', K('x', a), b)
  redis.call('SADD', K('x', b), a)
end
if leaver ~= '' then
  -- a pair relayed through Redis (across nodes, or on one node after a resume moved one side)
  local stayer = b
  if leaver == b then stayer = a end
  notify(stayer, leaver, 'peer_left', reason)
end
return 1
"""

#: ARGV[3] = cid.
LEAVE = PRELUDE + r"""
local cid = ARGV[3]
if redis.call('HGET', K('c', cid), 'state') == 'chatting' then
  return redis.error_reply('CALLER client ' .. cid .. ' is still paired; unpair first')
end
forget(cid)
return 1
"""

#: ARGV[3] = cid. A waiting client's connection dropped (its session kept for
#: RESUME): it keeps its place but nobody is paired with it. Returns 1, or 0 if not waiting.
SET_AWAY = PRELUDE + r"""
local cid = ARGV[3]
if redis.call('HGET', K('c', cid), 'state') ~= 'waiting' then return 0 end
redis.call('HSET', K('c', cid), 'away', '1')
return 1
"""

#: ARGV[3] = cid. An away client is back: {status, waiter, waiter_name, ghosts},
#: status ``matched`` (paired now), ``waiting`` (still waits) or ``none`` (was not away).
BACK = PRELUDE + r"""
local cid = ARGV[3]
if redis.call('HGET', K('c', cid), 'away') ~= '1' then return {'none', '', '', {}} end
redis.call('HDEL', K('c', cid), 'away')
local rec = redis.call('HMGET', K('c', cid), 'room', 'name')
local w, ghosts = first_waiter(cid, rec[1])
if not w then return {'waiting', '', '', ghosts} end
local wname = redis.call('HGET', K('c', w), 'name') or ''
redis.call('LREM', K('q', rec[1]), 1, cid)
pair(w, cid, rec[2], rec[1])
return {'matched', w, wname, ghosts}
"""

#: ARGV[3..6] = node, boot token, ttl ms, epoch candidate. Returns {epoch, told}.
REGISTER = PRELUDE + r"""
local node, token, ttl = ARGV[3], ARGV[4], ARGV[5]
redis.call('SET', EPOCH, ARGV[6], 'NX')
local told = {}
if redis.call('GET', K('node', node)) ~= token then
  told = purge(node)  -- a stale registration: this node id's previous run
end
redis.call('SET', K('node', node), token, 'PX', ttl)
redis.call('SADD', NODES, node)
return {redis.call('GET', EPOCH), told}
"""

#: ARGV[3..7] = node, boot token, ttl ms, epoch the node knows, epoch candidate.
#: Returns {status, epoch}: ok, expired (key had lapsed; data may have been
#: purged), reset (Redis lost its data), taken (another run holds the id).
HEARTBEAT = PRELUDE + r"""
local node, token, ttl, known = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
redis.call('SET', EPOCH, ARGV[7], 'NX')
local epoch = redis.call('GET', EPOCH)
local cur = redis.call('GET', K('node', node))
if cur and cur ~= token and cur ~= '?' then return {'taken', epoch} end
local status = 'ok'
if cur == token then
  redis.call('PEXPIRE', K('node', node), ttl)
else
  redis.call('SET', K('node', node), token, 'PX', ttl)
  status = 'expired'
end
redis.call('SADD', NODES, node)
if epoch ~= known then status = 'reset' end
return {status, epoch}
"""

#: ARGV[3] = node. Returns {0, {}} if the node is alive after all, else {1, told}.
PURGE_NODE = PRELUDE + r"""
local node = ARGV[3]
if alive(node) then return {0, {}} end
local told = purge(node)
redis.call('SREM', NODES, node)
return {1, told}
"""

#: ARGV[3..6] = node, rebuild ('1': Redis lost its data), ttl ms, number of
#: waiting clients; then (cid, name, room) per waiting client in queue order,
#: then (cid, partner, name, partner_name, room) per chatting client.
#: Returns {matched {waiter, newcomer, waiter_name, ...}, ended {cid, partner, ...}, ghosts}.
RESTORE = PRELUDE + r"""
local node, rebuild, ttl, nwait = ARGV[3], ARGV[4] == '1', ARGV[5], tonumber(ARGV[6])
local matched, ended, ghosts = {}, {}, {}
local i = 7
for _ = 1, nwait do
  local cid, name, room = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  local st = redis.call('HGET', K('c', cid), 'state')
  if st ~= 'waiting' and st ~= 'chatting' then
    local r = join(cid, name, room, true)
    for _, g in ipairs(r[4]) do ghosts[#ghosts + 1] = g end
    if r[1] == 'matched' then
      matched[#matched + 1] = r[2]; matched[#matched + 1] = cid; matched[#matched + 1] = r[3]
    end
  end
end
while i + 4 <= #ARGV do
  local a, b, name, bname, room = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  local ra = redis.call('HMGET', K('c', a), 'state', 'partner')
  local rb = redis.call('HMGET', K('c', b), 'state', 'partner')
  local bn = nodeof(b)
  if ra[1] == 'chatting' and ra[2] == b then
    -- intact
  elseif not ra[1] and rb[1] == 'chatting' and rb[2] == a then
    redis.call('HSET', K('c', a), 'state', 'chatting', 'partner', b, 'room', room, 'name', name)
    redis.call('SADD', K('nc', node), a)
  elseif not ra[1] and not rb[1] and (rebuild or bn == node) then
    redis.call('HSET', K('c', a), 'state', 'chatting', 'partner', b, 'room', room, 'name', name)
    redis.call('HSET', K('c', b), 'state', 'chatting', 'partner', a, 'room', room, 'name', bname)
    redis.call('SADD', K('nc', node), a)
    redis.call('SADD', K('nc', bn), b)
    redis.call('HINCRBY', ROOMS, room, 1)
    if bn ~= node then
      redis.call('SADD', NODES, bn)
      redis.call('SET', K('node', bn), '?', 'PX', ttl, 'NX')  -- a grace period to come back
    end
  else
    ended[#ended + 1] = a; ended[#ended + 1] = b
  end
end
return {matched, ended, ghosts}
"""

#: ARGV[3..8] = old cid, new cid (on the adopting node), partner or '', '1' to tell the
#: partner's node (``moved``), the session's state (JSON), the token's hash (``s:HASH``
#: names the new cid from then on, for RESUMEs that reach a third node). A resumed session moves to
#: another node: the client's records, its queue place, its partner's record and its
#: NEXT exclusions follow it, the adopting node gets ``adopt`` (the state), and
#: both happen at once. Returns 1, or 0 if the old client is gone (``refused`` sent).
MOVE = PRELUDE + r"""
local old, new, p, tell, state, tok = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local rec = redis.call('HGETALL', K('c', old))
if #rec == 0 then
  notify(new, old, 'refused', '')
  return 0
end
redis.call('DEL', K('c', old))
redis.call('SREM', K('nc', nodeof(old)), old)
redis.call('HSET', K('c', new), unpack(rec))
redis.call('HSET', K('c', new), 'tok', tok)
redis.call('SET', K('s', tok), new)
redis.call('SADD', K('nc', nodeof(new)), new)
local st = redis.call('HMGET', K('c', new), 'state', 'room')
if st[1] == 'waiting' then
  local i = redis.call('LPOS', K('q', st[2]), old)
  if i then redis.call('LSET', K('q', st[2]), i, new) end
end
if p ~= '' and redis.call('HGET', K('c', p), 'partner') == old then
  redis.call('HSET', K('c', p), 'partner', new)
end
for _, other in ipairs(redis.call('SMEMBERS', K('x', old))) do
  redis.call('SREM', K('x', other), old)
  redis.call('SADD', K('x', other), new)
end
if redis.call('EXISTS', K('x', old)) == 1 then redis.call('RENAME', K('x', old), K('x', new)) end
notify(new, old, 'adopt', state)
if tell == '1' then notify(p, old, 'moved', new) end
return 1
"""

ALL = {"move": MOVE, "join": JOIN, "unpair": UNPAIR, "leave": LEAVE, "set_away": SET_AWAY, "back": BACK, "register": REGISTER,
       "heartbeat": HEARTBEAT, "purge_node": PURGE_NODE, "restore": RESTORE}
