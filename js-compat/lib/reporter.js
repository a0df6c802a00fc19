// A node test runner reporter (`--test-reporter=./lib/reporter.js`): collects every test's
// result, writes report.json, report.txt and report.html to REPORT_DIR (default js-compat/report),
// prints the table, then repeats the runner's summary counts so they close the output.
import { mkdirSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { buildReport, renderHtml, renderText } from './report.js'

const here = path.dirname(fileURLToPath(import.meta.url))

export function reportDir(env = process.env) {
  return path.resolve(env.REPORT_DIR ?? path.join(here, '..', 'report'))
}

export function describeTarget(env = process.env) {
  if (env.REALTIME_URL) {
    return { mode: 'external', url: env.REALTIME_URL, label: env.REPORT_LABEL ?? null }
  }
  return { mode: 'self', url: null, label: env.REPORT_LABEL ?? null, bin: env.WALCAST_BIN ?? null }
}

export default async function* conformanceReporter(source) {
  const results = []
  const summary = []
  for await (const event of source) {
    const { type, data } = event
    if ((type === 'test:pass' || type === 'test:fail') && data.nesting === 0) {
      const skipped = data.skip !== undefined && data.skip !== false
      let state = type === 'test:fail' ? 'fail' : 'pass'
      let message = null
      if (skipped) {
        state = 'skip'
        message = typeof data.skip === 'string' ? data.skip : 'skipped'
      } else if (state === 'fail') {
        const err = data.details?.error
        message = err?.cause?.message ?? err?.message ?? String(err)
      }
      results.push({ name: data.name, file: data.file ?? null, state, message })
    } else if (type === 'test:diagnostic' && data.nesting === 0 && /^(tests|suites|pass|fail|cancelled|skipped|todo|duration_ms) /.test(data.message)) {
      summary.push(data.message)
    }
  }
  const report = buildReport(results, describeTarget())
  const text = renderText(report)
  const dir = reportDir()
  mkdirSync(dir, { recursive: true })
  writeFileSync(path.join(dir, 'report.json'), JSON.stringify(report, null, 2) + '\n')
  writeFileSync(path.join(dir, 'report.txt'), text)
  writeFileSync(path.join(dir, 'report.html'), renderHtml(report))
  yield `\n${text}\nReport written to ${dir}/report.{json,txt,html}\n`
  if (summary.length) yield summary.map((s) => `ℹ ${s}`).join('\n') + '\n'
}
