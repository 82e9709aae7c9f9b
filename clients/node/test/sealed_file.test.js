'use strict';
// Sealed files of several 1 MiB segments, made here with Node's crypto by a tiny test-only
// sealer written from the format (not from lib/sealed_file.js), and attacked segment by
// segment; the open is streamed with bounded memory; the `open` subcommand of the CLI.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');
const { Writable } = require('node:stream');
const { spawnSync } = require('node:child_process');
const lib = require('../lib');

const E = lib.errors;
const MiB = 1 << 20;
const SEGMENT = MiB;
const TAG = 16;
const FIRST_PLAIN = SEGMENT - 40 - TAG;
const PLAIN = SEGMENT - TAG;

// --- a test-only sealer, from the format -------------------------------------------------------

function header(keyId) {
  const id = Buffer.from(keyId, 'ascii');
  return Buffer.concat([Buffer.from('ENCLSEAL'), Buffer.from([1, id.length]), id]);
}

/** The plaintext length of segment i of a file of `total` plaintext bytes, and whether last. */
function plainSizes(total) {
  const sizes = [];
  let left = total;
  for (let i = 0; ; i++) {
    const size = Math.min(left, i === 0 ? FIRST_PLAIN : PLAIN);
    left -= size;
    sizes.push(size);
    if (left === 0) return sizes;
  }
}

/**
 * Seals `total` plaintext bytes given by plainAt(offset, length) (a Buffer) under key and
 * keyId; yields the encloud header and Tink header, then one Buffer per segment.
 */
function* sealGen(key, keyId, total, plainAt, { salt = crypto.randomBytes(32), prefix = crypto.randomBytes(7) } = {}) {
  const h = header(keyId);
  const kFile = Buffer.from(crypto.hkdfSync('sha256', key, salt, h, 32));
  yield Buffer.concat([h, Buffer.from([40]), salt, prefix]);
  const sizes = plainSizes(total);
  let offset = 0;
  for (let i = 0; i < sizes.length; i++) {
    const nonce = Buffer.alloc(12);
    prefix.copy(nonce);
    nonce.writeUInt32BE(i, 7);
    nonce[11] = i === sizes.length - 1 ? 1 : 0;
    const cipher = crypto.createCipheriv('aes-256-gcm', kFile, nonce);
    const body = cipher.update(plainAt(offset, sizes[i]));
    cipher.final();
    offset += sizes[i];
    yield Buffer.concat([body, cipher.getAuthTag()]);
  }
}

/** { head, segments, plaintext, sealed } for a plaintext held in memory. */
function seal(key, keyId, plaintext, opts) {
  const [head, ...segments] = sealGen(key, keyId, plaintext.length, (o, n) => plaintext.subarray(o, o + n), opts);
  return { head, segments, plaintext, sealed: Buffer.concat([head, ...segments]) };
}

function* rechunk(parts, size) {
  for (const part of parts) {
    for (let i = 0; i < part.length; i += size) yield part.subarray(i, i + size);
  }
}

function collector() {
  const parts = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      parts.push(chunk);
      cb();
    },
  });
  sink.data = () => Buffer.concat(parts);
  return sink;
}

async function refused(promise, cls) {
  await assert.rejects(promise, (err) => {
    assert.ok(err instanceof cls, `expected ${cls.name}, got ${err && err.name}: ${err && err.message}`);
    assert.ok(err instanceof E.SealedFileError && err instanceof E.EncloudError);
    return true;
  });
}

const KEY = crypto.createHash('sha256').update('node sealed file test key').digest();
const KEY_ID = 'owner-1/node:test.v1';
const PLAINTEXT = crypto.randomBytes(2.5 * MiB);
const FILE = seal(KEY, KEY_ID, PLAINTEXT);

// --- tests ----------------------------------------------------------------------------------------

test('sealed file: the test sealer makes the layout of the format', () => {
  assert.deepEqual(plainSizes(PLAINTEXT.length), [FIRST_PLAIN, PLAIN, PLAINTEXT.length - FIRST_PLAIN - PLAIN]);
  assert.deepEqual(FILE.segments.map((s) => s.length), [SEGMENT - 40, SEGMENT, PLAINTEXT.length - FIRST_PLAIN - PLAIN + TAG]);
  assert.deepEqual(plainSizes(0), [0]);
  assert.deepEqual(plainSizes(FIRST_PLAIN), [FIRST_PLAIN]);
  assert.deepEqual(plainSizes(FIRST_PLAIN + 1), [FIRST_PLAIN, 1]);
});

test('sealed file: 2.5 MiB in three segments opens, from a buffer and from a stream', async () => {
  const opened = await lib.openSealedBuffer(FILE.sealed, KEY, { expectedKeyId: KEY_ID });
  assert.equal(opened.keyId, KEY_ID);
  assert.equal(opened.version, 1);
  assert.ok(opened.plaintext.equals(PLAINTEXT));
  for (const size of [13, 4096, 64 * 1024, 3 * MiB]) {
    const sink = collector();
    const stats = {};
    const result = await lib.openSealedFile(rechunk([FILE.sealed], size), sink, KEY, { stats });
    assert.deepEqual(result, { keyId: KEY_ID, version: 1, bytes: PLAINTEXT.length });
    assert.ok(sink.data().equals(PLAINTEXT), `chunks of ${size}`);
    assert.ok(sink.writableFinished, 'the output is ended by default');
    assert.equal(stats.segments, 3);
  }
  // A Readable (Node's own stream) works, and end: false leaves the output open.
  const sink = collector();
  const result = await lib.openSealedFile(require('node:stream').Readable.from(rechunk([FILE.sealed], 65536)), sink, KEY, { end: false });
  assert.equal(result.bytes, PLAINTEXT.length);
  assert.ok(!sink.writableEnded);
  assert.ok(sink.data().equals(PLAINTEXT));
});

test('sealed file: plaintexts on and around the segment boundaries', async () => {
  for (const n of [0, 1, FIRST_PLAIN - 1, FIRST_PLAIN, FIRST_PLAIN + 1, FIRST_PLAIN + PLAIN, FIRST_PLAIN + PLAIN + 1]) {
    const plaintext = crypto.randomBytes(n);
    const f = seal(KEY, 'k', plaintext);
    const opened = await lib.openSealedBuffer(f.sealed, KEY);
    assert.ok(opened.plaintext.equals(plaintext), `${n} bytes`);
    // Cut at the last boundary, when there is more than one segment: refused.
    if (f.segments.length > 1) {
      await refused(lib.openSealedBuffer(Buffer.concat([f.head, ...f.segments.slice(0, -1)]), KEY), E.SealedFileDecryptError);
    }
  }
});

test('sealed file: attacks on the segments are refused with SealedFileDecryptError', async (t) => {
  const [s0, s1, s2] = FILE.segments;
  const other = seal(KEY, KEY_ID, crypto.randomBytes(2.5 * MiB)); // same key and key id, another salt
  const sameSalt = seal(KEY, KEY_ID, crypto.randomBytes(2.5 * MiB), { salt: FILE.head.subarray(FILE.head.length - 39, FILE.head.length - 7), prefix: crypto.randomBytes(7) });
  const big = seal(KEY, KEY_ID, crypto.randomBytes(3.5 * MiB)); // segments 1 and 2 both full
  const flip = (buf, at) => {
    const out = Buffer.from(buf);
    out[at] ^= 1;
    return out;
  };
  // Each case, and how many plaintext bytes reach the output before the segment that fails
  // (only segments that authenticated are written).
  const A = FIRST_PLAIN;
  const B = FIRST_PLAIN + PLAIN;
  const cases = {
    'segments 0 and 1 swapped': [[FILE.head, s1, s0, s2], 0],
    'segments 1 and 2 swapped (both full, boundaries intact)': [[big.head, big.segments[0], big.segments[2], big.segments[1], big.segments[3]], A],
    'the middle segment dropped': [[FILE.head, s0, s2], A],
    'the last segment dropped (truncated at a boundary)': [[FILE.head, s0, s1], A],
    'only the first segment left': [[FILE.head, s0], 0],
    'no segment at all': [[FILE.head], 0],
    'truncated inside the last segment': [[FILE.head, s0, s1, s2.subarray(0, s2.length - 1)], B],
    'truncated inside a middle segment': [[FILE.head, s0, s1.subarray(0, 1000)], A],
    'a segment of another file (same key and key id) spliced in': [[FILE.head, s0, other.segments[1], s2], A],
    'the last segment of another file spliced in': [[FILE.head, s0, s1, other.segments[2]], B],
    "another file's segments under this file's header": [[FILE.head, ...other.segments], 0],
    'a segment of a file with the same salt, another nonce prefix': [[FILE.head, s0, sameSalt.segments[1], s2], A],
    'one byte appended': [[FILE.head, s0, s1, s2, Buffer.from([0])], B],
    'a whole segment appended': [[FILE.head, s0, s1, s2, s1], B],
    'a bit flipped in the middle segment': [[FILE.head, s0, flip(s1, 12345), s2], A],
    'a bit flipped in the last tag': [[FILE.head, s0, s1, flip(s2, s2.length - 1)], B],
  };
  for (const [name, [parts, written]] of Object.entries(cases)) {
    await t.test(name, async () => {
      await refused(lib.openSealedBuffer(Buffer.concat(parts), KEY), E.SealedFileDecryptError);
      const sink = collector();
      await refused(lib.openSealedFile(rechunk(parts, 65536), sink, KEY), E.SealedFileDecryptError);
      assert.ok(!sink.writableEnded, 'a failed open does not end the output');
      const got = sink.data();
      const source = parts[0] === big.head ? big.plaintext : PLAINTEXT;
      assert.equal(got.length, written);
      assert.ok(got.equals(source.subarray(0, written)));
    });
  }
  await t.test('another 32-byte key', async () => {
    await refused(lib.openSealedBuffer(FILE.sealed, crypto.randomBytes(32)), E.SealedFileDecryptError);
  });
  await t.test('the key id renamed in the header', async () => {
    const renamed = Buffer.concat([header('owner-1/node:test.v2'), FILE.sealed.subarray(FILE.head.length - 40)]);
    await refused(lib.openSealedBuffer(renamed, KEY), E.SealedFileDecryptError);
  });
  await t.test('the expected key id differs', async () => {
    await refused(lib.openSealedBuffer(FILE.sealed, KEY, { expectedKeyId: 'owner-1/other' }), E.SealedFileKeyIdError);
  });
});

test('sealed file: headers that are not a sealed file are SealedFileFormatError', async () => {
  const body = FILE.sealed.subarray(FILE.head.length - 40);
  const cases = [
    Buffer.alloc(0),
    Buffer.from('ENCLSEA'),
    Buffer.concat([Buffer.from('ENCLSEAL'), Buffer.from([2, 1]), Buffer.from('k'), body]),
    Buffer.concat([Buffer.from('ENCLSEAL'), Buffer.from([0, 1]), Buffer.from('k'), body]),
    Buffer.concat([Buffer.from('ENCLSEAL'), Buffer.from([1, 0]), body]),
    Buffer.concat([Buffer.from('ENCLSEAL'), Buffer.from([1, 3]), Buffer.from('a b'), body]),
    Buffer.concat([Buffer.from('ENCLSEAL'), Buffer.from([1, 1]), Buffer.from([0xe9]), body]),
    Buffer.concat([Buffer.from('ENCLSEAL'), Buffer.from([1, 129]), Buffer.alloc(129, 'a'), body]),
    Buffer.concat([Buffer.from('ENCLSEAL'), Buffer.from([1, 5]), Buffer.from('abc')]),
    FILE.sealed.subarray(0, FILE.head.length - 1), // the Tink header cut short
    Buffer.concat([FILE.head.subarray(0, FILE.head.length - 40), Buffer.from([0]), FILE.head.subarray(FILE.head.length - 39)]),
  ];
  for (const data of cases) await refused(lib.openSealedBuffer(data, KEY), E.SealedFileFormatError);
  // The key id is checked before the Tink header (as the reference does).
  await refused(lib.openSealedBuffer(FILE.head.subarray(0, FILE.head.length - 40), KEY, { expectedKeyId: 'x' }), E.SealedFileKeyIdError);
  // 128 characters is the longest key id.
  const long = 'a'.repeat(128);
  const f = seal(KEY, long, Buffer.from('x'));
  assert.equal((await lib.openSealedBuffer(f.sealed, KEY)).keyId, long);
});

test('sealed file: the key is 32 bytes, the input and output are checked', async () => {
  await assert.rejects(lib.openSealedBuffer(FILE.sealed, KEY.subarray(0, 31)), RangeError);
  await assert.rejects(lib.openSealedBuffer(FILE.sealed, Buffer.concat([KEY, Buffer.from([0])])), RangeError);
  await assert.rejects(lib.openSealedBuffer(FILE.sealed, KEY.toString('hex')), TypeError);
  await assert.rejects(lib.openSealedFile([FILE.sealed], collector(), Buffer.alloc(16)), RangeError);
  await assert.rejects(lib.openSealedFile([FILE.sealed], {}, KEY), TypeError);
  await assert.rejects(lib.openSealedFile(42, collector(), KEY), TypeError);
  await assert.rejects(lib.openSealedFile(['not a buffer'], collector(), KEY), TypeError);
  await assert.rejects(lib.openSealedBuffer('a string', KEY), TypeError);
  await assert.rejects(lib.openSealedBuffer(FILE.sealed, KEY, { expectedKeyId: 7 }), TypeError);
  // A Uint8Array key and input are fine.
  const opened = await lib.openSealedBuffer(new Uint8Array(FILE.sealed), new Uint8Array(KEY));
  assert.equal(opened.plaintext.length, PLAINTEXT.length);
});

test('sealed file: readKeyFile takes 32 raw bytes or 64 hex digits', () => {
  assert.ok(lib.readKeyFile(KEY).equals(KEY));
  assert.ok(lib.readKeyFile(Buffer.from(`${KEY.toString('hex')}\n`)).equals(KEY));
  assert.ok(lib.readKeyFile(Buffer.from(` \t${KEY.toString('hex').toUpperCase()}\r\n\n`)).equals(KEY));
  const rawHexLooking = Buffer.from('0123456789abcdef0123456789abcdef');
  assert.throws(() => lib.readKeyFile(rawHexLooking), RangeError, 'a 128-bit hex key is refused');
  for (const bad of [Buffer.alloc(0), Buffer.alloc(31), Buffer.alloc(33), Buffer.from('ab'.repeat(31) + 'a'), Buffer.from('zz'.repeat(32)), Buffer.from(`${'ab'.repeat(16)} ${'ab'.repeat(16)}`)]) {
    assert.throws(() => lib.readKeyFile(bad), RangeError);
  }
  assert.throws(() => lib.readKeyFile('a'.repeat(64)), TypeError);
});

test('sealed file: opening a stream holds about two segments, never the whole file', async (t) => {
  // 2.5 MiB in 64 KiB chunks: the implementation's own count of what it holds at once.
  let yielded = 0;
  let yieldedAtFirstWrite = null;
  const chunks = function* () {
    for (const chunk of rechunk([FILE.sealed], 65536)) {
      yielded += chunk.length;
      yield chunk;
    }
  };
  const parts = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      if (yieldedAtFirstWrite === null) yieldedAtFirstWrite = yielded;
      parts.push(chunk);
      cb();
    },
  });
  const stats = {};
  await lib.openSealedFile(chunks(), sink, KEY, { stats });
  assert.ok(Buffer.concat(parts).equals(PLAINTEXT));
  assert.ok(stats.maxHeldBytes <= 2 * SEGMENT + 65536, `held ${stats.maxHeldBytes}`);
  // The first segment's plaintext went out after reading one segment and one chunk more.
  assert.ok(yieldedAtFirstWrite < SEGMENT + 2 * 65536, `${yieldedAtFirstWrite} bytes read before the first write`);

  // 256 MiB sealed and opened on the fly (neither side ever holds the file): the process's
  // ArrayBuffer memory stays far below the file's size.
  const total = 256 * MiB;
  const pattern = crypto.randomBytes(PLAIN);
  const plainAt = (offset, n) => pattern.subarray(0, n);
  const hashIn = crypto.createHash('sha256');
  for (const size of plainSizes(total)) hashIn.update(pattern.subarray(0, size));
  const baseline = process.memoryUsage().arrayBuffers;
  let peak = 0;
  const sample = () => {
    peak = Math.max(peak, process.memoryUsage().arrayBuffers - baseline);
  };
  const source = function* () {
    for (const chunk of rechunk(sealGen(KEY, KEY_ID, total, plainAt), 65536)) {
      sample();
      yield chunk;
    }
  };
  const hashOut = crypto.createHash('sha256');
  const out = new Writable({
    write(chunk, _enc, cb) {
      hashOut.update(chunk);
      sample();
      cb();
    },
  });
  const bigStats = {};
  const result = await lib.openSealedFile(source(), out, KEY, { stats: bigStats });
  assert.equal(result.bytes, total);
  assert.equal(hashOut.digest('hex'), hashIn.digest('hex'));
  assert.ok(bigStats.maxHeldBytes <= 2 * SEGMENT + 65536, `held ${bigStats.maxHeldBytes}`);
  t.diagnostic(`held at most ${bigStats.maxHeldBytes} bytes; ArrayBuffer memory peaked ${(peak / MiB).toFixed(1)} MiB above its start`);
  assert.ok(peak < total / 4, `ArrayBuffer memory grew by ${(peak / MiB).toFixed(1)} MiB for a ${total / MiB} MiB file`);
});

// --- the CLI --------------------------------------------------------------------------------------

const BIN = path.resolve(__dirname, '..', 'bin', 'encloud-node.js');
const cli = (...args) => spawnSync(process.execPath, [BIN, 'open', ...args], { encoding: 'utf8' });

test('CLI: open IN -o OUT --key KEYFILE [--key-id K]', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'encloud-node-open-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const p = (name) => path.join(dir, name);
  fs.writeFileSync(p('key.hex'), `${KEY.toString('hex')}\n`);
  fs.writeFileSync(p('key.raw'), KEY);
  fs.writeFileSync(p('other.key'), crypto.randomBytes(32));
  fs.writeFileSync(p('file.sealed'), FILE.sealed);
  fs.writeFileSync(p('cut.sealed'), Buffer.concat([FILE.head, FILE.segments[0], FILE.segments[1]]));
  const listing = () => fs.readdirSync(dir).sort();
  const before = listing();

  await t.test('opens, one line on stderr', () => {
    const r = cli(p('file.sealed'), '-o', p('out.bin'), '--key', p('key.hex'));
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, '');
    assert.equal(r.stderr, `opened ${p('file.sealed')} (key id ${KEY_ID}, ${PLAINTEXT.length} bytes) -> ${p('out.bin')}\n`);
    assert.ok(fs.readFileSync(p('out.bin')).equals(PLAINTEXT));
    fs.unlinkSync(p('out.bin'));
  });
  await t.test('a raw key file, --key-id, options in another order', () => {
    const r = cli('--key', p('key.raw'), '--key-id', KEY_ID, '-o', p('out2.bin'), p('file.sealed'));
    assert.equal(r.status, 0, r.stderr);
    assert.ok(fs.readFileSync(p('out2.bin')).equals(PLAINTEXT));
    fs.unlinkSync(p('out2.bin'));
  });
  await t.test('an existing OUT is replaced only by a file that opened', () => {
    fs.writeFileSync(p('keep.bin'), 'old');
    const bad = cli(p('cut.sealed'), '-o', p('keep.bin'), '--key', p('key.hex'));
    assert.equal(bad.status, 1);
    assert.equal(fs.readFileSync(p('keep.bin'), 'utf8'), 'old');
    const good = cli(p('file.sealed'), '-o', p('keep.bin'), '--key', p('key.hex'));
    assert.equal(good.status, 0, good.stderr);
    assert.ok(fs.readFileSync(p('keep.bin')).equals(PLAINTEXT));
    fs.unlinkSync(p('keep.bin'));
  });
  const failures = {
    'truncated at a segment boundary': [[p('cut.sealed'), '-o', p('out.bin'), '--key', p('key.hex')], /^encloud-node open: SealedFileDecryptError: segment 1 of the sealed file does not open\n$/],
    'the wrong key': [[p('file.sealed'), '-o', p('out.bin'), '--key', p('other.key')], /^encloud-node open: SealedFileDecryptError: /],
    'another key id': [[p('file.sealed'), '-o', p('out.bin'), '--key', p('key.hex'), '--key-id', 'owner-1/other'], /^encloud-node open: SealedFileKeyIdError: /],
    'not a sealed file': [[p('key.hex'), '-o', p('out.bin'), '--key', p('key.hex')], /^encloud-node open: SealedFileFormatError: not an encloud sealed file\n$/],
    'a missing input': [[p('missing'), '-o', p('out.bin'), '--key', p('key.hex')], /^encloud-node open: ENOENT: .*missing/],
    'a bad key file': [[p('file.sealed'), '-o', p('out.bin'), '--key', p('file.sealed')], /^encloud-node open: RangeError: a key file holds 32 raw bytes or 64 hex digits\n$/],
  };
  for (const [name, [args, stderr]] of Object.entries(failures)) {
    await t.test(`${name}: exit 1, one line, no OUT`, () => {
      const r = cli(...args);
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, stderr);
      assert.equal(r.stderr.split('\n').length, 2, r.stderr);
      assert.equal(r.stdout, '');
      assert.deepEqual(listing(), before, 'no OUT and no temporary file left');
    });
  }
  await t.test('usage mistakes: exit 2, one line', () => {
    for (const args of [[], [p('file.sealed')], [p('file.sealed'), '-o', p('out.bin')], [p('file.sealed'), '--key', p('key.hex')], [p('file.sealed'), p('x'), '-o', p('out.bin'), '--key', p('key.hex')], [p('file.sealed'), '-o', p('out.bin'), '--key', p('key.hex'), '--bogus'], [p('file.sealed'), '--key']]) {
      const r = cli(...args);
      assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, /^encloud-node open: [^\n]+\n$/);
    }
    assert.deepEqual(listing(), before);
  });
});
