// Shared by the widget and the dashboard: who the user is (the token in the URL's fragment,
// which the browser never sends to the server), the supabase-js client (the published browser
// build, vendor/supabase.js, loaded as a classic script before this module), and calls to the
// example's endpoint, which runs a fixed set of SQL functions as the caller (see schema.sql).

const fragment = new URLSearchParams(location.hash.slice(1))
export const token = fragment.get('token')
if (!token) {
  document.body.textContent = 'Open this page with the URL `walcast dev --example support-chat` printed (it carries a token).'
  throw new Error('no token in the URL fragment')
}
const claims = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')))
export const me = { id: claims.sub, name: claims.user_metadata?.name ?? 'Guest', role: claims.role }

// `?vsn=1.0.0` picks the older JSON-only protocol; the default is supabase-js's own.
const vsn = new URLSearchParams(location.search).get('vsn')
export const supabase = window.supabase.createClient(location.origin, token, {
  realtime: vsn ? { vsn } : {},
  auth: { persistSession: false, autoRefreshToken: false },
})

// What arrived over realtime, for the browser test to inspect (and for curious developers).
export const received = (window.__received = [])

/** Marks `name` ready (a channel subscribed, or subscribed to PostgreSQL) on <body data-ready>. */
export function ready(name, on = true) {
  const set = new Set((document.body.dataset.ready ?? '').split(' ').filter(Boolean))
  if (on) set.add(name)
  else set.delete(name)
  document.body.dataset.ready = [...set].sort().join(' ')
}

/** Subscribes; marks `name` ready when postgres_changes is live (or, without postgres_changes,
 *  when the channel is joined), and not ready when the channel drops. `onLive` runs each time
 *  postgres_changes becomes live, after a rejoin too: changes committed while the channel was
 *  down are not replayed, so that is when an app (re)loads what it shows. */
export function subscribe(channel, name, { postgres = false, onLive } = {}) {
  if (postgres) {
    channel.on('system', {}, async (p) => {
      if (p.extension !== 'postgres_changes') return
      if (p.status !== 'ok') return showError(`${name}: ${p.message}`)
      if (onLive) await onLive()
      ready(name)
    })
  }
  channel.subscribe((status, err) => {
    if (status === 'SUBSCRIBED') {
      if (!postgres) ready(name)
    } else {
      ready(name, false)
      if (status !== 'CLOSED') showError(`${name}: ${status} ${err?.message ?? ''}`)
    }
  })
  return channel
}

/** Calls `support_chat.<action>(args)` as this user. */
export async function api(action, args = {}) {
  const res = await fetch(`api/${action}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify(args),
  })
  const body = await res.json()
  if (!res.ok) {
    showError(`${action}: ${body.error}`)
    throw new Error(body.error)
  }
  return body.data
}

export function showError(text) {
  const el = document.getElementById('error')
  if (el) {
    el.textContent = text
    el.hidden = false
  }
  console.error(text)
}

/** Typing indicator over a private broadcast channel: send() at most once a second while the
 *  user types, `false` when they send; the other side's indicator expires after 4 s anyway. */
export function typing(conversationId, onTyping) {
  const channel = supabase.channel(`typing:${conversationId}`, { config: { private: true } })
  let timer
  channel.on('broadcast', { event: 'typing' }, ({ payload }) => {
    received.push({ kind: 'broadcast', payload })
    clearTimeout(timer)
    onTyping(payload.typing ? payload : null)
    if (payload.typing) timer = setTimeout(() => onTyping(null), 4000)
  })
  subscribe(channel, 'typing')
  let last = 0
  return {
    channel,
    keystroke() {
      if (Date.now() - last < 1000) return
      last = Date.now()
      channel.send({ type: 'broadcast', event: 'typing', payload: { typing: true, name: me.name, role: me.role } })
    },
    stop() {
      last = 0
      channel.send({ type: 'broadcast', event: 'typing', payload: { typing: false, name: me.name, role: me.role } })
    },
  }
}

/** Agents online, from presence on the private `support:agents` channel; agents `track`. */
export function agentsOnline(onChange, { track = false } = {}) {
  const channel = supabase.channel('support:agents', { config: { private: true, presence: { key: me.id } } })
  channel.on('presence', { event: 'sync' }, () => {
    const state = channel.presenceState()
    received.push({ kind: 'presence', state })
    const names = Object.values(state).map((metas) => metas[0]?.name).filter(Boolean)
    onChange([...new Set(names)].sort())
  })
  channel.subscribe(async (status) => {
    if (status !== 'SUBSCRIBED') return ready('agents', false)
    if (track) await channel.track({ name: me.name, online_at: new Date().toISOString() })
    ready('agents')
  })
  return channel
}

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag)
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v
    else if (k.startsWith('data-')) e.setAttribute(k, v)
    else e[k] = v
  }
  e.append(...children)
  return e
}

/** Shows a message once, in time order (history and live changes may arrive in any order).
 *  With `receipts` (the widget: the customer's own messages), the message carries its delivery
 *  state: "Sent" once the database has it (the page only shows what it read back or was sent by
 *  postgres_changes, so a shown message is committed), "Read" once an agent has read it
 *  (`read_at`, from history or a postgres_changes UPDATE). A later row may upgrade the state,
 *  never downgrade it: `read_at` is only ever set. */
export function renderMessage(list, m, { receipts = false } = {}) {
  const shown = list.querySelector(`[data-id="${m.id}"]`)
  if (shown) return receipts && showReceipt(shown, m)
  const at = Date.parse(m.created_at)
  const time = new Date(at).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
  const item = el('div', { class: `msg ${m.sender_type}`, 'data-id': m.id, 'data-at': String(at) },
    el('div', { class: 'meta' }, `${m.sender_name} · ${time}`),
    el('div', { class: 'text' }, m.content))
  if (receipts && m.sender_type === 'customer') {
    item.append(el('div', { class: 'receipt', 'data-state': 'sent' }, 'Sent'))
    showReceipt(item, m)
  }
  const later = [...list.children].find((c) => Number(c.dataset.at) > at)
  list.insertBefore(item, later ?? null)
  list.scrollTop = list.scrollHeight
}

function showReceipt(item, m) {
  const receipt = item.querySelector('.receipt')
  if (!receipt || !m.read_at || receipt.dataset.state === 'read') return
  const time = new Date(Date.parse(m.read_at)).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
  receipt.dataset.state = 'read'
  receipt.title = `Read at ${time}`
  receipt.textContent = 'Read'
}
