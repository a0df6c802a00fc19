// A node test runner reporter (`--test-reporter=./lib/reporter.js`) that records every top-level
// test's result as one JSON line in REPORT_DIR/results.jsonl, as it happens: `npm test` passes
// --test-force-exit (supabase-js leaves timers armed), which ends the runner before a reporter's
// stream ends, so bin/kit.js builds the report from this file once the runner has exited.
import { appendFileSync, mkdirSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const here = path.dirname(fileURLToPath(import.meta.url))

export function reportDir(env = process.env) {
  return path.resolve(env.REPORT_DIR ?? path.join(here, '..', 'report'))
}

export function resultsFile(env = process.env) {
  return path.join(reportDir(env), 'results.jsonl')
}

export function describeTarget(env = process.env) {
  if (env.REALTIME_URL) {
    return { mode: 'external', url: env.REALTIME_URL, label: env.REPORT_LABEL ?? null }
  }
  return { mode: 'self', url: null, label: env.REPORT_LABEL ?? null }
}

/** One test:pass / test:fail event as a result record, or null for nested tests. */
export function resultOf(type, data) {
  if ((type !== 'test:pass' && type !== 'test:fail') || data.nesting !== 0) return null
  const skipped = data.skip !== undefined && data.skip !== false
  if (skipped) return { name: data.name, file: data.file ?? null, state: 'skip', message: typeof data.skip === 'string' ? data.skip : 'skipped' }
  if (type === 'test:pass') return { name: data.name, file: data.file ?? null, state: 'pass', message: null }
  const err = data.details?.error
  return { name: data.name, file: data.file ?? null, state: 'fail', message: err?.cause?.message ?? err?.message ?? String(err) }
}

export default async function* resultsRecorder(source) {
  const file = resultsFile()
  mkdirSync(path.dirname(file), { recursive: true })
  writeFileSync(file, '')
  for await (const { type, data } of source) {
    const r = resultOf(type, data)
    if (r) appendFileSync(file, JSON.stringify(r) + '\n')
  }
  yield ''
}
