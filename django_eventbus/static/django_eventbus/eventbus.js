// django-eventbus browser client: events from EventsConsumer, over one websocket.
//
// A plain ES module (no build step, no dependency):
//
//   import { connect } from "/static/django_eventbus/eventbus.js";
//
//   const bus = connect("/ws/events/", {
//     onEvent: (event) => console.log(event.topic, event.type, event.payload),
//     onStatus: (status) => console.log(status),      // "connecting" | "open" | "closed"
//     onError: (frame) => console.warn(frame.code, frame.message),
//   });
//   bus.subscribe("inventory:*");
//
// The connection comes back by itself after it drops, with jittered exponential
// backoff. It then subscribes again, each subscription with `since` set to the
// last event id it saw (or the position the server gave when it subscribed), so
// the server replays what happened meanwhile: a page that loses its connection
// misses nothing (within the server's event log and WEBSOCKET_REPLAY_LIMIT).
// An event is handed to onEvent once, even when several subscriptions match it.

const SEEN_KEPT = 1000;

/** fnmatch (the server's pattern syntax) as a RegExp: "*", "?", "[abc]", "[!abc]". */
export function patternToRegExp(pattern) {
  let source = "";
  for (let i = 0; i < pattern.length; i++) {
    const char = pattern[i];
    if (char === "*") {
      source += "[\\s\\S]*";
    } else if (char === "?") {
      source += "[\\s\\S]";
    } else if (char === "[") {
      let j = i + 1;
      if (pattern[j] === "!") j++;
      if (pattern[j] === "]") j++;
      while (j < pattern.length && pattern[j] !== "]") j++;
      if (j >= pattern.length) {
        source += "\\[";
      } else {
        let body = pattern.slice(i + 1, j).replace(/\\/g, "\\\\");
        if (body[0] === "!") body = "^" + body.slice(1);
        else if (body[0] === "^") body = "\\" + body;
        source += "[" + body + "]";
        i = j;
      }
    } else {
      source += char.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    }
  }
  return new RegExp("^(?:" + source + ")$");
}

function isPattern(topic) {
  return /[*?[]/.test(topic);
}

/** A websocket URL from a path ("/ws/events/") or a full ws(s):// URL. */
function socketUrl(url) {
  if (/^wss?:\/\//.test(url)) return url;
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return scheme + "//" + window.location.host + url;
}

// Close codes of the server (django_eventbus.channels.consumer).
const CLOSE_REVOKED = 4401;
const CLOSE_TOO_MANY_CONNECTIONS = 4429;

export class EventBusClient {
  /**
   * @param {string} url  "/ws/events/" or "wss://host/ws/events/"
   * @param {object} [options]
   * @param {(event: object) => void} [options.onEvent]    each event (Event.to_dict()), once
   * @param {(status: string) => void} [options.onStatus]  "connecting" | "open" | "closed"
   * @param {(frame: object) => void} [options.onError]    error frames from the server
   * @param {(frame: object) => void} [options.onSubscribed]
   * @param {number} [options.minDelay=250]  first reconnect delay (ms)
   * @param {number} [options.maxDelay=10000]  longest reconnect delay (ms)
   */
  constructor(url, options = {}) {
    this.url = url;
    this.onEvent = options.onEvent || (() => {});
    this.onStatus = options.onStatus || (() => {});
    this.onError = options.onError || ((frame) => console.warn("eventbus:", frame.code, frame.message));
    this.onSubscribed = options.onSubscribed || (() => {});
    this.minDelay = options.minDelay ?? 250;
    this.maxDelay = options.maxDelay ?? 10000;
    this.status = "closed";
    this.lastEventId = null;
    // topic -> {since: the id to resume from (null: nothing yet), regexp}
    this._subscriptions = new Map();
    this._seen = new Set();
    this._seenOrder = [];
    this._socket = null;
    this._attempt = 0;
    this._timer = null;
    this._stopped = true;
  }

  /** Open the connection (and keep it open until close()). */
  connect() {
    this._stopped = false;
    if (!this._socket) this._open();
    return this;
  }

  /** Subscribe to a topic or pattern ("inventory:product", "inventory:*"); kept across reconnects. */
  subscribe(topic, { since = null } = {}) {
    if (!this._subscriptions.has(topic)) {
      this._subscriptions.set(topic, {
        since,
        regexp: isPattern(topic) ? patternToRegExp(topic) : null,
      });
    }
    if (this.status === "open") this._sendSubscribe(topic);
    return this;
  }

  unsubscribe(topic) {
    if (this._subscriptions.delete(topic) && this.status === "open") {
      this._send({ type: "unsubscribe", topic });
    }
    return this;
  }

  /** Close for good: no reconnect. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    if (this._socket) this._socket.close(1000);
    this._socket = null;
    this._setStatus("closed");
  }

  // -- internals -----------------------------------------------------------------------

  _open() {
    this._setStatus("connecting");
    let socket;
    try {
      socket = new WebSocket(socketUrl(this.url));
    } catch (error) {
      this._retry();
      return;
    }
    this._socket = socket;
    socket.onopen = () => {
      this._attempt = 0;
      this._setStatus("open");
      for (const topic of this._subscriptions.keys()) this._sendSubscribe(topic);
    };
    socket.onmessage = (message) => this._receive(message.data);
    socket.onclose = (event) => {
      if (this._socket !== socket) return;
      this._socket = null;
      if (event.code === CLOSE_REVOKED) {
        // Logged out or deactivated (the "revoked" error frame came first): coming back
        // would only be refused; the page has to log in again.
        this._stopped = true;
      } else if (event.code === CLOSE_TOO_MANY_CONNECTIONS) {
        // The socket had opened (resetting the backoff): wait the longest delay instead.
        this._attempt = Math.max(this._attempt, Math.ceil(Math.log2(this.maxDelay / this.minDelay)));
      }
      if (this._stopped) {
        this._setStatus("closed");
      } else {
        this._retry();
      }
    };
    // An error is followed by close, which schedules the reconnect.
    socket.onerror = () => {};
  }

  _retry() {
    this._setStatus("closed");
    // "Equal jitter": half fixed, half random, so a crowd of pages does not come back at once.
    const delay = Math.min(this.maxDelay, this.minDelay * 2 ** this._attempt);
    this._attempt++;
    this._timer = setTimeout(() => {
      if (!this._stopped) this._open();
    }, delay / 2 + Math.random() * (delay / 2));
  }

  _sendSubscribe(topic) {
    const frame = { type: "subscribe", topic };
    const since = this._subscriptions.get(topic).since;
    if (since !== null && since !== undefined) frame.since = since;
    this._send(frame);
  }

  _send(frame) {
    if (this._socket && this._socket.readyState === WebSocket.OPEN) {
      this._socket.send(JSON.stringify(frame));
    }
  }

  _receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (error) {
      return;
    }
    if (frame.type === "event") {
      this._onEventFrame(frame.event);
    } else if (frame.type === "subscribed") {
      const subscription = this._subscriptions.get(frame.topic);
      // The server's position for this subscription: everything after it comes next.
      if (subscription && frame.last_event_id !== null && frame.last_event_id !== undefined) {
        subscription.since = frame.last_event_id;
      }
      this.onSubscribed(frame);
    } else if (frame.type === "error") {
      this.onError(frame);
    }
  }

  _onEventFrame(event) {
    // Frames arrive in order, so the newest event a subscription matched is where it resumes.
    for (const [topic, subscription] of this._subscriptions) {
      if (subscription.regexp ? subscription.regexp.test(event.topic) : topic === event.topic) {
        subscription.since = event.event_id;
      }
    }
    this.lastEventId = event.event_id;
    if (this._seen.has(event.event_id)) return;
    this._seen.add(event.event_id);
    this._seenOrder.push(event.event_id);
    if (this._seenOrder.length > SEEN_KEPT) this._seen.delete(this._seenOrder.shift());
    try {
      this.onEvent(event);
    } catch (error) {
      console.error("eventbus: onEvent failed", error);
    }
  }

  _setStatus(status) {
    if (this.status !== status) {
      this.status = status;
      this.onStatus(status);
    }
  }
}

/** Create a client and connect it. */
export function connect(url, options = {}) {
  return new EventBusClient(url, options).connect();
}
