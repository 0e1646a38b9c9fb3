// Ogg pages for Opus (RFC 3533, RFC 7845): a writer for the microphone stream and a demuxer for the
// bridge's reply audio. Our own code, no library. Granule positions count 48 kHz samples, always.

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

/** Ogg's CRC-32: polynomial 0x04c11db7, not reflected, initial value 0, no final xor. */
export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) {
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  }
  return crc;
}

const FLAG_CONTINUED = 0x01;
const FLAG_BOS = 0x02;
const FLAG_EOS = 0x04;

/** One Ogg page holding whole packets (each at most 255 * 255 bytes in all). */
export function oggPage({ packets, granule, serial, sequence, bos = false, eos = false }) {
  const lacing = [];
  for (const packet of packets) {
    let left = packet.length;
    while (left >= 255) {
      lacing.push(255);
      left -= 255;
    }
    lacing.push(left); // a packet whose length is a multiple of 255 ends with a 0
  }
  if (lacing.length > 255) throw new Error(`an Ogg page holds at most 255 segments, got ${lacing.length}`);
  const bodyLength = packets.reduce((n, p) => n + p.length, 0);
  const page = new Uint8Array(27 + lacing.length + bodyLength);
  const view = new DataView(page.buffer);
  page.set([0x4f, 0x67, 0x67, 0x53], 0); // "OggS"
  page[4] = 0; // version
  page[5] = (bos ? FLAG_BOS : 0) | (eos ? FLAG_EOS : 0);
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial >>> 0, true);
  view.setUint32(18, sequence >>> 0, true);
  view.setUint32(22, 0, true); // CRC, filled in below
  page[26] = lacing.length;
  page.set(lacing, 27);
  let at = 27 + lacing.length;
  for (const packet of packets) {
    page.set(packet, at);
    at += packet.length;
  }
  view.setUint32(22, oggCrc(page), true);
  return page;
}

/** The "OpusHead" identification header (RFC 7845 section 5.1), mono, mapping family 0. */
export function opusHead({ channels = 1, preSkip = 312, inputSampleRate = 24000 } = {}) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(new TextEncoder().encode("OpusHead"), 0);
  head[8] = 1; // version
  head[9] = channels;
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputSampleRate, true);
  view.setInt16(16, 0, true); // output gain
  head[18] = 0; // channel mapping family
  return head;
}

/** The "OpusTags" comment header, with a vendor string and no comments. */
export function opusTags(vendor = "personaplex test-voice") {
  const vendorBytes = new TextEncoder().encode(vendor);
  const tags = new Uint8Array(8 + 4 + vendorBytes.length + 4);
  const view = new DataView(tags.buffer);
  tags.set(new TextEncoder().encode("OpusTags"), 0);
  view.setUint32(8, vendorBytes.length, true);
  tags.set(vendorBytes, 12);
  view.setUint32(12 + vendorBytes.length, 0, true);
  return tags;
}

/** Samples (at 48 kHz) in one Opus packet, from its TOC byte (RFC 6716 section 3.1). */
export function opusPacketSamples(packet) {
  if (packet.length < 1) return 0;
  const toc = packet[0];
  const config = toc >> 3;
  let frame;
  if (config < 12) frame = [480, 960, 1920, 2880][config & 3]; // SILK: 10, 20, 40, 60 ms
  else if (config < 16) frame = [480, 960][config & 1]; // hybrid: 10, 20 ms
  else frame = [120, 240, 480, 960][config & 3]; // CELT: 2.5, 5, 10, 20 ms
  const code = toc & 3;
  let count = 1;
  if (code === 1 || code === 2) count = 2;
  else if (code === 3) count = packet.length > 1 ? packet[1] & 0x3f : 0;
  return frame * count;
}

/**
 * A continuous Ogg/Opus stream written page by page: `headers()` once (two pages: OpusHead and
 * OpusTags), then `page(packets)` for each group of packets (the page is stamped with the granule
 * position at its end).
 */
export class OggOpusWriter {
  constructor({ preSkip = 312, inputSampleRate = 24000, head = null } = {}) {
    this.serial = (Math.random() * 0xffffffff) >>> 0;
    this.sequence = 0;
    this.preSkip = preSkip;
    this.head = head ?? opusHead({ preSkip, inputSampleRate });
    this.granule = preSkip; // RFC 7845: the granule position counts the pre-skip too
  }

  headers() {
    const first = oggPage({ packets: [this.head], granule: 0, serial: this.serial, sequence: this.sequence++, bos: true });
    const second = oggPage({ packets: [opusTags()], granule: 0, serial: this.serial, sequence: this.sequence++ });
    const both = new Uint8Array(first.length + second.length);
    both.set(first, 0);
    both.set(second, first.length);
    return both;
  }

  page(packets, { eos = false } = {}) {
    for (const packet of packets) this.granule += opusPacketSamples(packet);
    return oggPage({ packets, granule: this.granule, serial: this.serial, sequence: this.sequence++, eos });
  }
}

/**
 * Splits bytes into Ogg pages and pages into packets. `push(bytes)` returns the events found so far,
 * in order: `{kind: "start", head}` when a stream begins (its OpusHead packet), `{kind: "packet", data}`
 * for each audio packet (OpusTags is skipped). Bytes may hold several pages, or part of one.
 */
export class OggOpusDemuxer {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // segments of a packet that continues on the next page
    this.packetIndex = 0; // packets seen in the current logical stream
    this.serial = null;
  }

  reset() {
    this.buffer = new Uint8Array(0);
    this.partial = [];
    this.packetIndex = 0;
    this.serial = null;
  }

  push(bytes) {
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer, 0);
    joined.set(bytes, this.buffer.length);
    const events = [];
    let pos = 0;
    while (joined.length - pos >= 27) {
      if (joined[pos] !== 0x4f || joined[pos + 1] !== 0x67 || joined[pos + 2] !== 0x67 || joined[pos + 3] !== 0x53) {
        throw new Error("not an Ogg page (no 'OggS' capture pattern)");
      }
      const nsegs = joined[pos + 26];
      if (joined.length - pos < 27 + nsegs) break;
      const lacing = joined.subarray(pos + 27, pos + 27 + nsegs);
      const bodyLength = lacing.reduce((n, v) => n + v, 0);
      const end = pos + 27 + nsegs + bodyLength;
      if (joined.length < end) break;
      const flags = joined[pos + 5];
      const serial = new DataView(joined.buffer, joined.byteOffset + pos + 14, 4).getUint32(0, true);
      if (flags & FLAG_BOS || serial !== this.serial) {
        this.serial = serial;
        this.packetIndex = 0;
        this.partial = [];
      } else if (!(flags & FLAG_CONTINUED)) {
        this.partial = [];
      }
      let at = pos + 27 + nsegs;
      let segments = this.partial;
      for (const size of lacing) {
        segments.push(joined.subarray(at, at + size));
        at += size;
        if (size < 255) {
          events.push(...this._packet(concat(segments)));
          segments = [];
        }
      }
      this.partial = segments.map((s) => s.slice());
      pos = end;
    }
    this.buffer = joined.slice(pos);
    return events;
  }

  _packet(data) {
    const index = this.packetIndex++;
    if (index === 0) {
      if (!startsWith(data, "OpusHead")) throw new Error("an Ogg stream must begin with an OpusHead packet");
      return [{ kind: "start", head: data.slice() }];
    }
    if (index === 1 && startsWith(data, "OpusTags")) return [];
    return [{ kind: "packet", data: data.slice() }];
  }
}

function concat(parts) {
  if (parts.length === 1) return parts[0];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function startsWith(bytes, ascii) {
  if (bytes.length < ascii.length) return false;
  for (let i = 0; i < ascii.length; i++) if (bytes[i] !== ascii.charCodeAt(i)) return false;
  return true;
}

/** Pre-skip (48 kHz samples) of an OpusHead packet. */
export function headPreSkip(head) {
  return new DataView(head.buffer, head.byteOffset, head.length).getUint16(10, true);
}
