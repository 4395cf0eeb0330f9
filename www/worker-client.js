// The page's side of the training worker (www/worker.js): starting it, replacing it after a lost
// GPU, messages one way, and requests that the worker answers with a 'reply' carrying their id.

export class TrainingWorker {
  #worker = null;
  #pending = new Map();
  #nextId = 0;

  /// `handlers[type](message)` receives each of the worker's messages but replies;
  /// `onFailure(event)` an error the worker did not catch.
  constructor(handlers, onFailure) {
    this.handlers = handlers;
    this.onFailure = onFailure;
  }

  get started() {
    return this.#worker !== null;
  }

  launch() {
    this.#worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
    this.#worker.onmessage = ({ data }) =>
      data.type === 'reply' ? this.#settle(data) : this.handlers[data.type](data);
    this.#worker.onerror = (e) => this.onFailure(e);
    // `?simd=simd128` in the page's address loads the module without relaxed SIMD here too.
    this.#worker.postMessage({ type: 'init', simd: new URLSearchParams(location.search).get('simd') });
  }

  /// A new worker in place of this one (whose wasm module holds a dead device); what was asked
  /// of the old one fails.
  replace() {
    this.#worker.terminate();
    for (const { reject } of this.#pending.values()) reject(new Error('the training worker was replaced'));
    this.#pending.clear();
    this.launch();
  }

  tell(message, transfer = []) {
    this.#worker.postMessage(message, transfer);
  }

  /// Resolves to the worker's reply, or rejects with the error it names.
  ask(message, transfer = []) {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#worker.postMessage({ ...message, id }, transfer);
    });
  }

  #settle({ id, value, error }) {
    const request = this.#pending.get(id);
    this.#pending.delete(id);
    if (error) request.reject(new Error(error));
    else request.resolve(value);
  }
}
