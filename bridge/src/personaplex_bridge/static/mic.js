// The microphone path: getUserMedia -> AudioContext at 24 kHz -> AudioWorklet (80 ms blocks of
// float32) -> WebCodecs AudioEncoder (Opus, mono, 20 ms packets) -> one Ogg page per 80 ms.

import { OggOpusWriter, headPreSkip } from "./ogg.js";

export const SAMPLE_RATE = 24000;
export const BLOCK_SAMPLES = 1920; // 80 ms
const PAGE_SAMPLES_48K = 3840; // 80 ms counted at 48 kHz, as Ogg/Opus granules are
const SILENCE_DBFS = -45; // the bridge's default BRIDGE_ASR_SILENCE_DBFS

export const ENCODER_CONFIG = {
  codec: "opus",
  sampleRate: SAMPLE_RATE,
  numberOfChannels: 1,
  bitrate: 32000,
  opus: { frameDuration: 20000, format: "opus" }, // 20 ms packets, four per page
};

export function levelDbfs(block) {
  let sum = 0;
  for (let i = 0; i < block.length; i++) sum += block[i] * block[i];
  const rms = Math.sqrt(sum / block.length);
  return rms > 0 ? 20 * Math.log10(rms) : -Infinity;
}

/**
 * Captures the microphone (`open()` ... `close()`), and encodes it into an Ogg/Opus stream while a voice
 * session is on (`beginStream(onPage)` ... `endStream()`): each voice session gets a fresh stream,
 * headers first. `muted` sends silence instead of the microphone (the stream stays continuous).
 */
export class Microphone {
  constructor(context, { onError, onBlock } = {}) {
    this.context = context;
    this.onError = onError ?? ((e) => console.warn(e));
    this.onBlock = onBlock ?? (() => {});
    this.muted = false;
    this.stream = null;
    this.source = null;
    this.node = null;
    this.encoder = null;
    this.writer = null;
    this.onPage = null;
    this.packets = [];
    this.packetSamples = 0;
    this.timestampUs = 0;
    this.lastLoudAt = null; // performance.now() of the last 80 ms block above the silence gate
    this.workletLoaded = false;
  }

  static async supported() {
    if (!window.isSecureContext) {
      return "this page is not a secure context: open it over https, or as http://localhost or http://127.0.0.1";
    }
    if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") {
      return "this browser has no WebCodecs AudioEncoder/AudioDecoder (use a current Chrome, Chromium or Edge)";
    }
    const { supported } = await AudioEncoder.isConfigSupported(ENCODER_CONFIG);
    if (!supported) return "this browser's WebCodecs cannot encode 24 kHz mono Opus";
    return null;
  }

  async open() {
    if (this.stream) return;
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    if (!this.workletLoaded) {
      // Once per context: a second addModule would register the processor twice.
      await this.context.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
      this.workletLoaded = true;
    }
    this.source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, "capture-processor", { numberOfOutputs: 1, outputChannelCount: [1] });
    this.node.port.onmessage = (event) => this._block(event.data);
    this.source.connect(this.node);
    this.node.connect(this.context.destination); // pulled by the graph; its output is silence
  }

  /** Gives the microphone back (the browser's recording indicator goes off); `open()` again later. */
  close() {
    this.endStream();
    if (this.node) this.node.disconnect();
    if (this.source) this.source.disconnect();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = this.source = this.node = null;
  }

  get streaming() {
    return this.encoder !== null;
  }

  beginStream(onPage) {
    this.endStream();
    this.onPage = onPage;
    this.writer = null; // made at the first packet, from the encoder's OpusHead (its pre-skip)
    this.packets = [];
    this.packetSamples = 0;
    this.timestampUs = 0;
    this.encoder = new AudioEncoder({
      output: (chunk, metadata) => this._packet(chunk, metadata),
      error: (e) => this.onError(`Opus encoder: ${e.message}`),
    });
    this.encoder.configure(ENCODER_CONFIG);
  }

  endStream() {
    if (this.encoder) {
      const encoder = this.encoder;
      this.encoder = null;
      if (encoder.state !== "closed") encoder.close();
    }
    this.onPage = null;
    this.writer = null;
  }

  _block(samples) {
    const pcm = this.muted ? new Float32Array(samples.length) : samples;
    const level = levelDbfs(pcm);
    if (level > SILENCE_DBFS) this.lastLoudAt = performance.now();
    this.onBlock(level);
    if (!this.encoder || this.encoder.state !== "configured") return;
    const data = new AudioData({
      format: "f32",
      sampleRate: SAMPLE_RATE,
      numberOfChannels: 1,
      numberOfFrames: pcm.length,
      timestamp: this.timestampUs,
      data: pcm,
    });
    this.timestampUs += (pcm.length * 1e6) / SAMPLE_RATE;
    this.encoder.encode(data);
    data.close();
  }

  _packet(chunk, metadata) {
    if (!this.onPage) return;
    if (!this.writer) {
      const description = metadata?.decoderConfig?.description;
      let preSkip = 312;
      if (description) {
        const head = ArrayBuffer.isView(description)
          ? new Uint8Array(description.buffer, description.byteOffset, description.byteLength)
          : new Uint8Array(description);
        if (head.length >= 19 && String.fromCharCode(...head.subarray(0, 8)) === "OpusHead") preSkip = headPreSkip(head);
      }
      this.writer = new OggOpusWriter({ preSkip, inputSampleRate: SAMPLE_RATE });
      this.onPage(this.writer.headers());
    }
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    this.packets.push(packet);
    const duration = chunk.duration ? Math.round((chunk.duration * 48000) / 1e6) : 960;
    this.packetSamples += duration;
    if (this.packetSamples >= PAGE_SAMPLES_48K) {
      this.onPage(this.writer.page(this.packets));
      this.packets = [];
      this.packetSamples = 0;
    }
  }
}
