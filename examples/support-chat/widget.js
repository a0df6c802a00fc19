// The customer's widget: start a conversation, then chat live with the agents.
// Messages and status: postgres_changes filtered by conversation id (only the customer's own
// rows reach them: walcast checks each change against the tables' policies as this user).
// Typing: broadcast on the private channel typing:<id>. Agents online: presence.
// Read receipts: postgres_changes UPDATE of messages (an agent set `read_at`), same filter.
import { supabase, me, api, subscribe, typing, agentsOnline, received, renderMessage, ready } from './chat.js'

const $ = (id) => document.getElementById(id)
$('me').textContent = me.name

agentsOnline((names) => {
  $('agents').textContent = names.length ? `● ${names.join(', ')} online` : 'No agent online'
  $('agents').classList.toggle('none', names.length === 0)
})

let current = null // { id, channels, typing }

async function open(conv) {
  if (current) for (const c of current.channels) await supabase.removeChannel(c)
  for (const name of ['messages', 'updates', 'typing', 'history']) ready(name, false)
  $('start').hidden = true
  $('chat').hidden = false
  $('messages').replaceChildren()
  showStatus(conv.status)
  const messages = subscribe(
    supabase
      .channel(`conversation:${conv.id}:messages`)
      .on(
        'postgres_changes',
        { event: 'INSERT', schema: 'support_chat', table: 'messages', filter: `conversation_id=eq.${conv.id}` },
        (p) => {
          received.push({ kind: 'postgres_changes', payload: p })
          renderMessage($('messages'), p.new, { receipts: true })
          if (p.new.sender_type === 'agent') showTyping(null)
        },
      )
      .on(
        'postgres_changes',
        { event: 'UPDATE', schema: 'support_chat', table: 'messages', filter: `conversation_id=eq.${conv.id}` },
        (p) => {
          received.push({ kind: 'postgres_changes', payload: p })
          renderMessage($('messages'), p.new, { receipts: true })
        },
      ),
    'messages',
    { postgres: true, onLive: () => loadHistory(conv.id) },
  )
  const updates = subscribe(
    supabase.channel(`conversation:${conv.id}:updates`).on(
      'postgres_changes',
      { event: 'UPDATE', schema: 'support_chat', table: 'conversations', filter: `id=eq.${conv.id}` },
      (p) => {
        received.push({ kind: 'postgres_changes', payload: p })
        showStatus(p.new.status)
      },
    ),
    'updates',
    {
      postgres: true,
      onLive: async () => {
        const row = (await api('list_conversations')).find((c) => c.id === conv.id)
        if (row && current?.id === conv.id) showStatus(row.status)
      },
    },
  )
  const t = typing(conv.id, showTyping)
  current = { id: conv.id, channels: [messages, updates, t.channel], typing: t }
}

// Once the messages channel is live (so nothing falls between the two; repeats are skipped).
async function loadHistory(id) {
  for (const m of await api('list_messages', { conversation_id: id })) {
    if (current?.id === id) renderMessage($('messages'), m, { receipts: true })
  }
  ready('history')
}

function showStatus(status) {
  $('status').textContent = status
  $('status').className = `badge ${status}`
  $('send').hidden = status === 'closed'
  $('new').hidden = status !== 'closed'
}

function showTyping(payload) {
  $('typing').hidden = !payload
  $('typing').textContent = payload ? `${payload.name} is typing…` : ''
  $('messages').scrollTop = $('messages').scrollHeight
}

$('start').addEventListener('submit', async (e) => {
  e.preventDefault()
  const content = $('first').value.trim()
  if (!content) return
  const { id } = await api('start_conversation', { content })
  $('first').value = ''
  await open({ id, status: 'waiting' })
})

$('send').addEventListener('submit', async (e) => {
  e.preventDefault()
  const content = $('text').value.trim()
  if (!content || !current) return
  $('text').value = '' // the message itself appears when the database says it was written
  current.typing.stop()
  await api('send_message', { conversation_id: current.id, content })
})
$('text').addEventListener('input', () => current?.typing.keystroke())

$('new').addEventListener('click', async () => {
  for (const c of current?.channels ?? []) await supabase.removeChannel(c)
  current = null
  $('chat').hidden = true
  $('start').hidden = false
})

// After a reload: carry on with the newest open conversation (the database knows it: the
// conversations policy gives this customer their own rows only).
const mine = await api('list_conversations')
const open_ = mine.find((c) => c.status !== 'closed')
if (open_) await open(open_)
else $('start').hidden = false
ready('loaded')
