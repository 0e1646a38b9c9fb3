// The reply path: 0x01 frames (Ogg pages) -> Ogg demuxer -> WebCodecs AudioDecoder -> AudioBuffers
// scheduled back to back on one AudioContext clock (no gaps), dropped at once on `interrupt()`.

import { OggOpusDemuxer } from "./ogg.js";

const START_LEAD_S = 0.05; // head start of the first buffer after an underrun (jitter margin)

export class Player {
  /**
   * `hooks.onDecoded(frames)` per decoded AudioData, `hooks.onPlayed(samples)` when a buffer has
   * played to its end, `hooks.onFirstAudio(startsAtMs)` for the first buffer of each reply (with the
   * performance.now() time it starts to sound), `hooks.onUnderrun()` when a reply's audio came too
   * late to follow the previous buffer (a gap), `hooks.onError(message)`.
   */
  constructor(context, hooks = {}) {
    this.context = context;
    this.hooks = hooks;
    this.demuxer = new OggOpusDemuxer();
    this.decoder = null;
    this.generation = 0; // bumped by interrupt(): outputs of older decoders are dropped
    this.dropping = false; // after interrupt(): ignore pages until a new stream begins
    this.sources = new Set();
    this.nextTime = 0;
    this.timestampUs = 0;
    this.replyStarted = false; // the current reply has produced sound
  }

  get playing() {
    return this.sources.size > 0;
  }

  /** Bytes of one 0x01 frame (the kind byte already removed). */
  push(bytes) {
    let events;
    try {
      events = this.demuxer.push(bytes);
    } catch (e) {
      this.demuxer.reset();
      this.hooks.onError?.(`reply audio: ${e.message}`);
      return;
    }
    for (const event of events) {
      if (event.kind === "start") this._startStream(event.head);
      else if (!this.dropping && this.decoder) this._decode(event.data);
    }
  }

  _startStream(head) {
    this.dropping = false;
    this.replyStarted = false;
    const old = this.decoder;
    if (old && old.state === "configured") old.flush().then(() => old.close(), () => {});
    const generation = this.generation;
    this.decoder = new AudioDecoder({
      output: (data) => this._output(data, generation),
      error: (e) => this.hooks.onError?.(`Opus decoder: ${e.message}`),
    });
    this.decoder.configure({ codec: "opus", sampleRate: 48000, numberOfChannels: 1, description: head });
    this.timestampUs = 0;
  }

  _decode(packet) {
    const chunk = new EncodedAudioChunk({ type: "key", timestamp: this.timestampUs, data: packet });
    this.timestampUs += 20000;
    this.decoder.decode(chunk);
  }

  _output(data, generation) {
    try {
      if (generation !== this.generation) return; // decoded before a barge-in: never played
      const frames = data.numberOfFrames;
      const samples = new Float32Array(frames);
      data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
      this.hooks.onDecoded?.(frames);
      this._schedule(samples, data.sampleRate);
    } finally {
      data.close();
    }
  }

  _schedule(samples, sampleRate) {
    const ctx = this.context;
    const buffer = ctx.createBuffer(1, samples.length, sampleRate);
    buffer.copyToChannel(samples, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const now = ctx.currentTime;
    if (this.nextTime < now) {
      // The first buffer of a reply, or an underrun: the audio came later than it plays.
      if (this.replyStarted) this.hooks.onUnderrun?.();
      this.nextTime = now + START_LEAD_S;
    }
    const startAt = this.nextTime;
    source.start(startAt);
    this.nextTime += buffer.duration;
    this.sources.add(source);
    source.onended = () => {
      if (!this.sources.delete(source)) return; // stopped by interrupt()
      this.hooks.onPlayed?.(samples.length);
    };
    if (!this.replyStarted) {
      this.replyStarted = true;
      this.hooks.onFirstAudio?.(performance.now() + (startAt - now) * 1000);
    }
  }

  /** Stop at once: what is playing and everything scheduled or still being decoded. */
  interrupt() {
    this.generation += 1;
    this.dropping = true;
    const stopped = this.sources.size;
    const sources = [...this.sources];
    this.sources.clear();
    for (const source of sources) {
      try {
        source.stop();
      } catch {
        /* already stopped */
      }
      source.disconnect();
    }
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = null;
    this.nextTime = 0;
    return stopped;
  }
}
