/** A connection waiting for a slot; `refuse` is called when it waited too long or the queue is dropped. */
interface Waiting {
  admit: () => void;
  refuse: () => void;
  timer: NodeJS.Timeout;
}

export interface AdmissionLimits {
  /** 0: no limit. */
  maxConnections: number;
  /** Waiting places when the limit is reached; 0 refuses at once. */
  queue: number;
  queueTimeoutMs: number;
}

/** A ticket for one connection: `leave` frees its slot (or its place in the queue). */
export interface Ticket {
  leave(): void;
}

/**
 * The concurrent-connection limit of one service (HAProxy's maxconn with its queue): up to
 * maxConnections run; the next `queue` wait in arrival order for a slot, at most queueTimeoutMs;
 * beyond that a connection is refused at once.
 */
export class Admission {
  private running = 0;
  private readonly waiting: Waiting[] = [];
  refused = 0;

  constructor(private limits: () => AdmissionLimits) {}

  get queued(): number {
    return this.waiting.length;
  }

  /** Calls `admit` now or later, or `refuse` (now, or once the wait ran out). */
  enter(admit: () => void, refuse: () => void): Ticket {
    const { maxConnections, queue, queueTimeoutMs } = this.limits();
    if (maxConnections === 0 || this.running < maxConnections) {
      this.running++;
      admit();
      return this.slotTicket();
    }
    if (this.waiting.length >= queue) {
      this.refused++;
      refuse();
      return { leave: () => undefined };
    }
    const entry: Waiting = {
      admit,
      refuse,
      timer: setTimeout(() => {
        this.remove(entry);
        this.refused++;
        refuse();
      }, queueTimeoutMs),
    };
    this.waiting.push(entry);
    let admitted = false;
    const ticket = this.slotTicket();
    entry.admit = () => {
      admitted = true;
      admit();
    };
    return {
      leave: () => {
        if (admitted) ticket.leave();
        else this.remove(entry);
      },
    };
  }

  /** A raised limit lets waiting connections in. */
  limitsChanged(): void {
    this.next();
  }

  private slotTicket(): Ticket {
    return new SlotTicket(this);
  }

  /** A running connection left (from its SlotTicket). */
  release(): void {
    this.running--;
    this.next();
  }

  private remove(entry: Waiting): void {
    clearTimeout(entry.timer);
    const i = this.waiting.indexOf(entry);
    if (i >= 0) this.waiting.splice(i, 1);
  }

  private next(): void {
    const { maxConnections } = this.limits();
    while (this.waiting.length > 0 && (maxConnections === 0 || this.running < maxConnections)) {
      const entry = this.waiting.shift() as Waiting;
      clearTimeout(entry.timer);
      this.running++;
      entry.admit();
    }
  }
}

/** A running connection's slot: a small object per connection rather than a closure and its context. */
class SlotTicket implements Ticket {
  private left = false;

  constructor(private readonly admission: Admission) {}

  leave(): void {
    if (this.left) return;
    this.left = true;
    this.admission.release();
  }
}
