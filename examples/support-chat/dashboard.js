// The agent's dashboard: every conversation, live (new ones, status changes, new activity),
// one open at a time with its messages, the customer's typing, a reply box and an internal note.
// Each conversation in the list shows how many of its customer's messages no agent has read yet
// (`unread_count`, kept by the database, arrives with the conversation's row); opening one marks
// them read (`mark_read` sets `read_at`, which the widget receives as an UPDATE of messages).
import { supabase, me, api, subscribe, typing, agentsOnline, received, renderMessage, el, ready } from './chat.js'

const $ = (id) => document.getElementById(id)
$('me').textContent = me.name

agentsOnline(
  (names) => $('agents').replaceChildren(...names.map((n) => el('li', { 'data-name': n }, `● ${n}`))),
  { track: true },
)

const conversations = new Map() // id -> row
let current = null // { id, channels, typing }

function renderList() {
  const rows = [...conversations.values()].sort((a, b) => b.last_message_at.localeCompare(a.last_message_at))
  $('conversations').replaceChildren(
    ...rows.map((c) => {
      const li = el('li', { 'data-id': c.id, class: c.id === current?.id ? 'selected' : '' },
        el('span', { class: 'name' }, c.customer_name),
        el('span', { class: 'unread', 'data-unread': String(c.unread_count ?? 0), title: 'unread messages', hidden: !c.unread_count },
          String(c.unread_count ?? 0)),
        el('span', { class: `badge ${c.status}` }, c.status))
      li.addEventListener('click', () => open(c.id))
      return li
    }),
  )
}

function upsert(row) {
  conversations.set(row.id, { ...conversations.get(row.id), ...row })
  renderList()
  if (row.id === current?.id) showHeader()
}

// The list: every INSERT and UPDATE of conversations (agents may see all of them).
subscribe(
  supabase
    .channel('conversations:list')
    .on('postgres_changes', { event: 'INSERT', schema: 'support_chat', table: 'conversations' }, (p) => {
      received.push({ kind: 'postgres_changes', payload: p })
      upsert(p.new)
    })
    .on('postgres_changes', { event: 'UPDATE', schema: 'support_chat', table: 'conversations' }, (p) => {
      received.push({ kind: 'postgres_changes', payload: p })
      upsert(p.new)
    }),
  'list',
  {
    postgres: true,
    // (Re)load the list once the channel is live: nothing committed before is missed.
    onLive: async () => {
      for (const c of await api('list_conversations')) upsert(c)
    },
  },
)

function showHeader() {
  const c = conversations.get(current.id)
  $('customer').textContent = c.customer_name
  $('status').textContent = c.status
  $('status').className = `badge ${c.status}`
  $('accept').hidden = c.status !== 'waiting'
  $('close').hidden = c.status === 'closed'
  if (document.activeElement !== $('note')) $('note').value = c.internal_note ?? ''
}

async function open(id) {
  if (current) for (const c of current.channels) await supabase.removeChannel(c)
  for (const name of ['messages', 'typing', 'history']) ready(name, false)
  current = { id, channels: [] }
  renderList()
  $('empty').hidden = true
  $('chat').hidden = false
  $('messages').replaceChildren()
  $('typing').hidden = true
  showHeader()
  const messages = subscribe(
    supabase.channel(`conversation:${id}:messages`).on(
      'postgres_changes',
      { event: 'INSERT', schema: 'support_chat', table: 'messages', filter: `conversation_id=eq.${id}` },
      (p) => {
        received.push({ kind: 'postgres_changes', payload: p })
        renderMessage($('messages'), p.new)
        if (p.new.sender_type === 'customer') {
          showTyping(null)
          if (!p.new.read_at) markRead(id)
        }
      },
    ),
    'messages',
    {
      postgres: true,
      onLive: async () => {
        for (const m of await api('list_messages', { conversation_id: id })) {
          if (current?.id === id) renderMessage($('messages'), m)
        }
        await markRead(id)
        ready('history')
      },
    },
  )
  const t = typing(id, showTyping)
  current.channels = [messages, t.channel]
  current.typing = t
}

// The open conversation is on screen: what its customer wrote has been read.
async function markRead(id) {
  if (current?.id === id) await api('mark_read', { conversation_id: id })
}

function showTyping(payload) {
  $('typing').hidden = !payload
  $('typing').textContent = payload ? `${payload.name} is typing…` : ''
}

$('send').addEventListener('submit', async (e) => {
  e.preventDefault()
  const content = $('text').value.trim()
  if (!content || !current) return
  $('text').value = ''
  current.typing.stop()
  await api('send_message', { conversation_id: current.id, content })
})
$('text').addEventListener('input', () => current?.typing.keystroke())
$('accept').addEventListener('click', () => api('set_status', { conversation_id: current.id, status: 'active' }))
$('close').addEventListener('click', () => api('set_status', { conversation_id: current.id, status: 'closed' }))
$('note-form').addEventListener('submit', async (e) => {
  e.preventDefault()
  await api('set_internal_note', { conversation_id: current.id, note: $('note').value })
  $('note').blur()
})

ready('loaded')
