#!/usr/bin/env node
// The conformance kit's command line.
//   node bin/kit.js [test files...]      run the kit (what `npm test` does): against the walcast it
//                                        starts itself, or against REALTIME_URL (see README.md);
//                                        writes report.{json,txt,html} to REPORT_DIR
//   node bin/kit.js --compare a.json b.json
//                                        print the checklist cells whose result differs between
//                                        two reports; exits 1 when there is a difference
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { buildReport, compareReports, renderComparison, renderHtml, renderText, REPORT_VERSION } from '../lib/report.js'
import { describeTarget, reportDir, resultsFile } from '../lib/reporter.js'

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..')
const args = process.argv.slice(2)

function readReport(file) {
  let report
  try {
    report = JSON.parse(readFileSync(file, 'utf8'))
  } catch (e) {
    console.error(`cannot read report ${file}: ${e.message}`)
    process.exit(2)
  }
  if (report.report_version !== REPORT_VERSION || !Array.isArray(report.features)) {
    console.error(`${file} is not a js-compat report (report_version ${REPORT_VERSION})`)
    process.exit(2)
  }
  return report
}

if (args[0] === '--compare') {
  if (args.length !== 3) {
    console.error('usage: node bin/kit.js --compare a.json b.json')
    process.exit(2)
  }
  const a = readReport(args[1])
  const b = readReport(args[2])
  const diffs = compareReports(a, b)
  process.stdout.write(renderComparison(a, b, diffs))
  process.exit(diffs.length ? 1 : 0)
}

if (args.some((a) => a.startsWith('-'))) {
  console.error('usage: node bin/kit.js [test files...] | node bin/kit.js --compare a.json b.json')
  process.exit(2)
}

if (process.env.REALTIME_URL && !process.env.ANON_KEY && !process.env.JWT_SECRET) {
  console.error('REALTIME_URL is set: the kit also needs ANON_KEY or JWT_SECRET (see README.md)')
  process.exit(2)
}

// The kit's own tests (kit-tests/) start walcast binaries of their own: not part of a run against
// an external deployment.
const files = args.length ? args : process.env.REALTIME_URL ? ['test/'] : ['test/', 'kit-tests/']
const run = spawnSync(
  process.execPath,
  [
    '--test',
    '--test-force-exit',
    '--test-concurrency=1',
    '--test-reporter=spec',
    '--test-reporter-destination=stdout',
    '--test-reporter=./lib/reporter.js',
    '--test-reporter-destination=stdout',
    ...files,
  ],
  { cwd: root, stdio: 'inherit' },
)

// The report, from what lib/reporter.js recorded; then the counts again, so that the runner's
// summary lines close the output.
const file = resultsFile()
const results = existsSync(file)
  ? readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l))
  : []
const report = buildReport(results, describeTarget())
const dir = reportDir()
writeFileSync(path.join(dir, 'report.json'), JSON.stringify(report, null, 2) + '\n')
writeFileSync(path.join(dir, 'report.txt'), renderText(report))
writeFileSync(path.join(dir, 'report.html'), renderHtml(report))
const count = (state) => results.filter((r) => r.state === state).length
process.stdout.write(`\n${renderText(report)}\nReport: ${dir}/report.{json,txt,html}\n`)
process.stdout.write(`ℹ tests ${results.length}\nℹ pass ${count('pass')}\nℹ fail ${count('fail')}\nℹ skipped ${count('skip')}\n`)
process.exit(run.status ?? 1)
