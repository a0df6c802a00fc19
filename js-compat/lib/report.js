// The conformance report: one row per checklist line (lib/features.js), one column per vsn, built
// from the results of the tagged tests. Pure functions; lib/reporter.js feeds them from the node
// test runner and writes the files, bin/kit.js --compare reads two of them back.
import { FEATURES } from './features.js'

export const REPORT_VERSION = 1
export const VSNS = ['2.0.0', '1.0.0']

/** Test names carry their tags: `[feature-a,feature-b] vsn 2.0.0: what it checks` (a test that
 *  mixes clients of both versions says `vsn 2.0.0+1.0.0`). Returns null for untagged names. */
export function parseTestName(name) {
  const m = /^\[([a-z0-9,-]+)\] vsn ([0-9.+]+): (.*)$/s.exec(name)
  if (!m) return null
  return { features: m[1].split(','), vsns: m[2].split('+'), title: m[3] }
}

export function testName(features, vsn, title) {
  return `[${features.join(',')}] vsn ${vsn}: ${title}`
}

/** One line of an error message, for a table cell. */
export function firstLine(message) {
  return String(message ?? '').split('\n').find((l) => l.trim() !== '')?.trim() ?? ''
}

/**
 * results: [{ name, file, state: 'pass'|'fail'|'skip', message }] (message: failure text or skip
 * reason). target: { mode, url, label }. Returns the report object written as report.json.
 */
export function buildReport(results, target = {}, features = FEATURES) {
  const known = new Set(features.map((f) => f.id))
  const cells = new Map() // `${id} ${vsn}` -> tests
  const untagged = []
  const unknownTags = []
  for (const r of results) {
    const tags = parseTestName(r.name)
    if (!tags) {
      untagged.push({ name: r.name, file: r.file, state: r.state, message: r.message ?? null })
      continue
    }
    for (const id of tags.features) {
      if (!known.has(id)) {
        unknownTags.push({ name: r.name, tag: id })
        continue
      }
      for (const vsn of tags.vsns) {
        const key = `${id} ${vsn}`
        if (!cells.has(key)) cells.set(key, [])
        cells.get(key).push({ name: r.name, file: r.file ?? null, state: r.state, message: r.message ?? null })
      }
    }
  }
  const rows = features.map((f) => {
    const byVsn = {}
    for (const vsn of VSNS) byVsn[vsn] = cell(f, cells.get(`${f.id} ${vsn}`) ?? [])
    return { id: f.id, line: f.line, status: f.status, note: f.note ?? null, results: byVsn }
  })
  const totals = { pass: 0, fail: 0, skip: 0, uncovered: 0, 'by-design': 0, 'not-implemented': 0 }
  for (const row of rows) for (const vsn of VSNS) totals[row.results[vsn].state] += 1
  return {
    report_version: REPORT_VERSION,
    kit: 'walcast js-compat',
    generated_at: new Date().toISOString(),
    target,
    vsns: VSNS,
    totals,
    tests: { pass: count(results, 'pass'), fail: count(results, 'fail'), skip: count(results, 'skip') },
    features: rows,
    untagged,
    unknown_tags: unknownTags,
  }
}

function count(results, state) {
  return results.filter((r) => r.state === state).length
}

function cell(feature, tests) {
  if (tests.length === 0) {
    const state = feature.status === 'implemented' ? 'uncovered' : feature.status
    const message = feature.status === 'implemented' ? 'no test checks this line' : (feature.note ?? null)
    return { state, message, tests: [] }
  }
  const failed = tests.find((t) => t.state === 'fail')
  if (failed) return { state: 'fail', message: `${failed.name}: ${firstLine(failed.message)}`, tests }
  if (tests.some((t) => t.state === 'pass')) return { state: 'pass', message: null, tests }
  const reasons = [...new Set(tests.map((t) => t.message).filter(Boolean))]
  return { state: 'skip', message: reasons.join('; ') || 'skipped', tests }
}

const MARK = { pass: 'pass', fail: 'FAIL', skip: 'skip', uncovered: '-', 'by-design': 'by design', 'not-implemented': 'not impl.' }

/** The table as text for the terminal and report.txt. */
export function renderText(report) {
  const idWidth = Math.max(...report.features.map((f) => f.id.length), 'feature'.length)
  const col = 11
  const pad = (s, n) => String(s).padEnd(n)
  const out = []
  out.push(`Conformance report: ${targetLabel(report.target)}`)
  out.push(`${pad('feature', idWidth)}  ${report.vsns.map((v) => pad(`vsn ${v}`, col)).join(' ')}`)
  out.push(`${'-'.repeat(idWidth)}  ${report.vsns.map(() => '-'.repeat(col)).join(' ')}`)
  for (const f of report.features) {
    out.push(`${pad(f.id, idWidth)}  ${report.vsns.map((v) => pad(MARK[f.results[v].state], col)).join(' ')}`.trimEnd())
  }
  const notes = (state, heading) => {
    const lines = []
    for (const f of report.features) {
      for (const v of report.vsns) {
        const c = f.results[v]
        if (c.state === state) lines.push(`  ${f.id} (vsn ${v}): ${c.message}`)
      }
    }
    if (lines.length) out.push('', heading, ...lines)
  }
  notes('fail', 'Failures:')
  notes('skip', 'Skipped:')
  const once = (state, heading) => {
    const lines = report.features.filter((f) => report.vsns.every((v) => f.results[v].state === state))
    if (lines.length) out.push('', heading, ...lines.map((f) => `  ${f.id}: ${f.note ?? f.line}`))
  }
  once('uncovered', 'Not covered by any test (implemented by walcast, no js-compat test yet):')
  once('by-design', 'Not implemented by design:')
  once('not-implemented', 'Not implemented:')
  const t = report.totals
  out.push('', `cells: ${t.pass} pass, ${t.fail} fail, ${t.skip} skipped, ${t.uncovered} not covered, ${t['by-design']} by design, ${t['not-implemented']} not implemented` +
    ` (tests: ${report.tests.pass} pass, ${report.tests.fail} fail, ${report.tests.skip} skipped)`)
  return out.join('\n') + '\n'
}

export function targetLabel(target = {}) {
  if (target.label) return target.label
  if (target.mode === 'external') return `external deployment ${target.url}`
  return 'walcast started by the kit'
}

const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c])

/** A small static page with the same table. */
export function renderHtml(report) {
  const rows = report.features.map((f) => {
    const cells = report.vsns.map((v) => {
      const c = f.results[v]
      return `<td class="${esc(c.state)}" title="${esc(c.message ?? '')}">${esc(MARK[c.state])}${c.message && c.state !== 'pass' ? `<div class="msg">${esc(c.message)}</div>` : ''}</td>`
    })
    return `<tr><th scope="row"><code>${esc(f.id)}</code><div class="line">${esc(f.line)}</div></th>${cells.join('')}</tr>`
  })
  const t = report.totals
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Realtime conformance: ${esc(targetLabel(report.target))}</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
.line{font-weight:normal;color:#555;font-size:12px;max-width:48em}.msg{font-size:12px;max-width:32em;white-space:pre-wrap}
.pass{background:#dfd}.fail{background:#fcc}.skip{background:#ffd}.uncovered{background:#eee}.by-design,.not-implemented{background:#e8eefc}
</style></head><body>
<h1>Realtime conformance report</h1>
<p>Target: ${esc(targetLabel(report.target))}. Generated ${esc(report.generated_at)}.
Cells: ${t.pass} pass, ${t.fail} fail, ${t.skip} skipped, ${t.uncovered} not covered, ${t['by-design']} by design, ${t['not-implemented']} not implemented.</p>
<table><thead><tr><th>checklist line</th>${report.vsns.map((v) => `<th>vsn ${esc(v)}</th>`).join('')}</tr></thead>
<tbody>
${rows.join('\n')}
</tbody></table></body></html>
`
}

/** The cells whose state differs between two reports (and the lines only one of them has). */
export function compareReports(a, b) {
  const diffs = []
  const bById = new Map(b.features.map((f) => [f.id, f]))
  const aIds = new Set(a.features.map((f) => f.id))
  const vsns = [...new Set([...(a.vsns ?? VSNS), ...(b.vsns ?? VSNS)])]
  for (const fa of a.features) {
    const fb = bById.get(fa.id)
    if (!fb) {
      diffs.push({ id: fa.id, vsn: null, a: 'present', b: 'absent', a_message: null, b_message: null })
      continue
    }
    for (const v of vsns) {
      const ca = fa.results[v] ?? { state: 'absent', message: null }
      const cb = fb.results[v] ?? { state: 'absent', message: null }
      if (ca.state !== cb.state) diffs.push({ id: fa.id, vsn: v, a: ca.state, b: cb.state, a_message: ca.message, b_message: cb.message })
    }
  }
  for (const fb of b.features) {
    if (!aIds.has(fb.id)) diffs.push({ id: fb.id, vsn: null, a: 'absent', b: 'present', a_message: null, b_message: null })
  }
  return diffs
}

export function renderComparison(a, b, diffs) {
  const out = [`A: ${targetLabel(a.target)} (${a.generated_at})`, `B: ${targetLabel(b.target)} (${b.generated_at})`]
  if (diffs.length === 0) {
    out.push('No differences: every checklist line has the same result under every vsn.')
    return out.join('\n') + '\n'
  }
  out.push(`${diffs.length} difference(s):`)
  for (const d of diffs) {
    const where = d.vsn ? `${d.id} (vsn ${d.vsn})` : d.id
    out.push(`  ${where}: A ${d.a}, B ${d.b}`)
    if (d.a_message && d.a !== 'pass') out.push(`    A: ${d.a_message}`)
    if (d.b_message && d.b !== 'pass') out.push(`    B: ${d.b_message}`)
  }
  return out.join('\n') + '\n'
}
