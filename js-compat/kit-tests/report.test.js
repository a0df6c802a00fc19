// The kit's own tests: the report (JSON, text, HTML), --compare, and skip-with-reason against an
// external deployment, end to end through `node --test` and lib/reporter.js.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { buildReport, compareReports, parseTestName, renderHtml, renderText, testName } from '../lib/report.js'
import { FEATURES } from '../lib/features.js'

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..')

function runFixture(env) {
  const dir = mkdtempSync(path.join(tmpdir(), 'kit-report-'))
  const childEnv = { PATH: process.env.PATH, REPORT_DIR: dir, ...env }
  if (process.env.WALCAST_BIN) childEnv.WALCAST_BIN = process.env.WALCAST_BIN
  const run = spawnSync(
    process.execPath,
    ['bin/kit.js', 'kit-tests/fixtures/tagged.fixture.js'],
    { cwd: root, env: childEnv, encoding: 'utf8' },
  )
  const report = JSON.parse(readFileSync(path.join(dir, 'report.json'), 'utf8'))
  const html = readFileSync(path.join(dir, 'report.html'), 'utf8')
  const txt = readFileSync(path.join(dir, 'report.txt'), 'utf8')
  rmSync(dir, { recursive: true, force: true })
  return { run, report, html, txt }
}

const row = (report, id) => report.features.find((f) => f.id === id)

test('test names carry feature and vsn tags, and parse back', () => {
  const name = testName(['broadcast', 'v2-binary'], '2.0.0+1.0.0', 'a title: with a colon')
  assert.equal(name, '[broadcast,v2-binary] vsn 2.0.0+1.0.0: a title: with a colon')
  assert.deepEqual(parseTestName(name), { features: ['broadcast', 'v2-binary'], vsns: ['2.0.0', '1.0.0'], title: 'a title: with a colon' })
  assert.equal(parseTestName('an untagged test'), null)
})

test('against an external deployment: pass, fail and skip-with-reason per feature x vsn, in JSON, text and HTML', () => {
  const { run, report, html, txt } = runFixture({ REALTIME_URL: 'http://127.0.0.1:9', ANON_KEY: 'an-anon-key', REPORT_LABEL: 'fixture' })
  assert.equal(run.status, 1, 'a failing test fails the run')
  assert.deepEqual(report.target, { mode: 'external', url: 'http://127.0.0.1:9', label: 'fixture' })
  assert.deepEqual(report.vsns, ['2.0.0', '1.0.0'])
  assert.equal(report.features.length, FEATURES.length, 'one row per checklist line')

  assert.equal(row(report, 'heartbeat').results['2.0.0'].state, 'pass')
  assert.equal(row(report, 'heartbeat').results['1.0.0'].state, 'pass')
  const leave = row(report, 'leave').results
  assert.equal(leave['2.0.0'].state, 'pass')
  assert.equal(leave['1.0.0'].state, 'fail')
  assert.match(leave['1.0.0'].message, /^\[leave\] vsn 1\.0\.0: fails under 1\.0\.0: leave went wrong$/)
  for (const vsn of ['2.0.0', '1.0.0']) {
    assert.equal(row(report, 'limits').results[vsn].state, 'skip')
    assert.match(row(report, 'limits').results[vsn].message, /needs control of the server/)
    assert.equal(row(report, 'rls').results[vsn].state, 'skip')
    assert.match(row(report, 'rls').results[vsn].message, /needs DATABASE_URL/)
    assert.match(row(report, 'token-expiry').results[vsn].message, /needs JWT_SECRET/)
    assert.equal(row(report, 'filters').results[vsn].state, 'uncovered')
    assert.equal(row(report, 'wal2json-slot').results[vsn].state, 'by-design')
    assert.equal(row(report, 'private-only').results[vsn].state, 'not-implemented')
  }
  assert.deepEqual(report.tests, { pass: 3, fail: 1, skip: 6 })

  // The text table: one line per feature, the failure and the skip reasons below it.
  assert.match(txt, /^Conformance report: fixture$/m)
  assert.match(txt, /^heartbeat +pass +pass$/m)
  assert.match(txt, /^leave +pass +FAIL$/m)
  assert.match(txt, /^limits +skip +skip$/m)
  assert.match(txt, /^ {2}leave \(vsn 1\.0\.0\): \[leave\] vsn 1\.0\.0: fails under 1\.0\.0: leave went wrong$/m)
  assert.match(txt, /^ {2}limits \(vsn 2\.0\.0\): needs control of the server/m)
  assert.match(txt, /^Not implemented by design:\n {2}tenant-host: /m)
  assert.match(txt, /^ {2}wal2json-slot: the original's wal2json internals/m)
  // ... and it is printed, followed by the runner's own summary counts.
  assert.match(run.stdout, /^heartbeat +pass +pass$/m)
  assert.match(run.stdout, /\nℹ tests 10\nℹ pass 3\nℹ fail 1\nℹ skipped 6\n$/)

  // The page holds the same cells.
  assert.match(html, /<td class="fail" title="\[leave\] vsn 1\.0\.0: fails under 1\.0\.0: leave went wrong">FAIL/)
  assert.equal((html.match(/<tr><th scope="row">/g) ?? []).length, FEATURES.length)
  assert.equal((html.match(/<td class="skip"/g) ?? []).length, 6)
})

test('against the kit\'s own walcast nothing is skipped for want of a signer, a database or control', () => {
  const { report } = runFixture({})
  assert.equal(report.target.mode, 'self')
  for (const id of ['limits', 'rls', 'token-expiry']) {
    for (const vsn of ['2.0.0', '1.0.0']) assert.equal(row(report, id).results[vsn].state, 'pass', `${id} ${vsn}`)
  }
})

test('a cell fails if any of its tests fails, passes if one passes and none fails, skips if all skip', () => {
  const results = [
    { name: '[broadcast] vsn 2.0.0: a', state: 'pass' },
    { name: '[broadcast] vsn 2.0.0: b', state: 'fail', message: 'boom\nstack' },
    { name: '[broadcast] vsn 1.0.0: a', state: 'pass' },
    { name: '[broadcast] vsn 1.0.0: c', state: 'skip', message: 'needs control' },
    { name: '[presence] vsn 2.0.0+1.0.0: mixed', state: 'skip', message: 'needs control' },
    { name: '[no-such-line] vsn 2.0.0: x', state: 'pass' },
    { name: 'untagged', state: 'pass' },
  ]
  const r = buildReport(results, { mode: 'self' })
  assert.deepEqual(
    { state: row(r, 'broadcast').results['2.0.0'].state, message: row(r, 'broadcast').results['2.0.0'].message },
    { state: 'fail', message: '[broadcast] vsn 2.0.0: b: boom' },
  )
  assert.equal(row(r, 'broadcast').results['1.0.0'].state, 'pass')
  assert.equal(row(r, 'presence').results['2.0.0'].state, 'skip')
  assert.equal(row(r, 'presence').results['1.0.0'].message, 'needs control')
  assert.deepEqual(r.unknown_tags, [{ name: '[no-such-line] vsn 2.0.0: x', tag: 'no-such-line' }])
  assert.equal(r.untagged.length, 1)
  assert.match(renderText(r), /^broadcast +FAIL +pass$/m)
  assert.doesNotMatch(renderHtml(r), /<script/)
})

test('the HTML page escapes what the server said', () => {
  const r = buildReport([{ name: '[broadcast] vsn 2.0.0: x', state: 'fail', message: '<script>alert(1)</script>' }])
  const html = renderHtml(r)
  assert.doesNotMatch(html, /<script>/)
  assert.match(html, /&lt;script&gt;alert\(1\)&lt;\/script&gt;/)
})

test('--compare prints the cells that differ, and exits 1 when any does', () => {
  const a = buildReport(
    [
      { name: '[broadcast] vsn 2.0.0: x', state: 'pass' },
      { name: '[broadcast] vsn 1.0.0: x', state: 'pass' },
      { name: '[presence] vsn 2.0.0+1.0.0: y', state: 'pass' },
    ],
    { mode: 'self', label: 'walcast' },
  )
  const b = buildReport(
    [
      { name: '[broadcast] vsn 2.0.0: x', state: 'fail', message: 'expected ok, got error' },
      { name: '[broadcast] vsn 1.0.0: x', state: 'pass' },
      { name: '[presence] vsn 2.0.0+1.0.0: y', state: 'skip', message: 'needs control' },
    ],
    { mode: 'external', url: 'http://localhost:8000', label: 'supabase/realtime' },
  )
  assert.deepEqual(
    compareReports(a, b).map((d) => [d.id, d.vsn, d.a, d.b]),
    [
      ['broadcast', '2.0.0', 'pass', 'fail'],
      ['presence', '2.0.0', 'pass', 'skip'],
      ['presence', '1.0.0', 'pass', 'skip'],
    ],
  )
  assert.deepEqual(compareReports(a, a), [])

  const dir = mkdtempSync(path.join(tmpdir(), 'kit-compare-'))
  try {
    writeFileSync(path.join(dir, 'a.json'), JSON.stringify(a))
    writeFileSync(path.join(dir, 'b.json'), JSON.stringify(b))
    const differ = spawnSync(process.execPath, ['bin/kit.js', '--compare', path.join(dir, 'a.json'), path.join(dir, 'b.json')], { cwd: root, encoding: 'utf8' })
    assert.equal(differ.status, 1)
    assert.equal(
      differ.stdout.split('\n').slice(2).join('\n'),
      [
        '3 difference(s):',
        '  broadcast (vsn 2.0.0): A pass, B fail',
        '    B: [broadcast] vsn 2.0.0: x: expected ok, got error',
        '  presence (vsn 2.0.0): A pass, B skip',
        '    B: needs control',
        '  presence (vsn 1.0.0): A pass, B skip',
        '    B: needs control',
        '',
      ].join('\n'),
    )
    assert.match(differ.stdout, /^A: walcast \(/)
    assert.match(differ.stdout, /\nB: supabase\/realtime \(/)
    const same = spawnSync(process.execPath, ['bin/kit.js', '--compare', path.join(dir, 'a.json'), path.join(dir, 'a.json')], { cwd: root, encoding: 'utf8' })
    assert.equal(same.status, 0)
    assert.match(same.stdout, /No differences/)
    writeFileSync(path.join(dir, 'junk.json'), '{"not":"a report"}')
    const junk = spawnSync(process.execPath, ['bin/kit.js', '--compare', path.join(dir, 'a.json'), path.join(dir, 'junk.json')], { cwd: root, encoding: 'utf8' })
    assert.equal(junk.status, 2)
    assert.match(junk.stderr, /is not a js-compat report/)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('an external deployment without ANON_KEY or JWT_SECRET is refused before any test runs', () => {
  const run = spawnSync(process.execPath, ['bin/kit.js'], { cwd: root, env: { PATH: process.env.PATH, REALTIME_URL: 'http://127.0.0.1:9' }, encoding: 'utf8' })
  assert.equal(run.status, 2)
  assert.match(run.stderr, /needs ANON_KEY or JWT_SECRET/)
})
