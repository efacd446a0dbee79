//! Numbers of the route table's slots (nexthops, ECMP groups, level groups) and when one may be
//! reused: not before every lookup that may still hold it has finished (see `fib::live`).

pub(super) const FREE: u8 = 0;
pub(super) const USED: u8 = 1;
/// Unreferenced by this batch, still referenced by what the maps hold.
pub(super) const PENDING: u8 = 2;
/// Unreferenced in the maps, maybe still held by a lookup in flight.
pub(super) const QUARANTINE: u8 = 3;

/// Numbers of one kind (nexthop slots, ECMP groups, L2 groups, L3 groups).
#[derive(Clone, Debug)]
pub(super) struct Pool {
    /// States of the numbers below `state.len()`; those above are free.
    state: Vec<u8>,
    /// Numbers given back; numbers from `fresh` to `n` were never handed out.
    free: Vec<u32>,
    fresh: u32,
    n: u32,
    pending: Vec<u32>,
    quarantine: Vec<u32>,
}

impl Pool {
    /// `n` numbers, of which those in `old_used` are pending (the table in the maps references
    /// them: not reusable before the new table is written and a grace period has passed).
    /// Memory follows the numbers in use, not `n`.
    pub(super) fn new(n: u32, old_used: impl IntoIterator<Item = u32>) -> Pool {
        let mut state = Vec::new();
        let mut pending = Vec::new();
        for u in old_used.into_iter().filter(|u| *u < n) {
            if state.len() <= u as usize {
                state.resize(u as usize + 1, FREE);
            }
            if state[u as usize] == FREE {
                state[u as usize] = PENDING;
                pending.push(u);
            }
        }
        Pool {
            state,
            free: Vec::new(),
            fresh: 0,
            n,
            pending,
            quarantine: Vec::new(),
        }
    }

    /// Takes `hint` when the old table used it for the same thing and nobody took it since.
    pub(super) fn take_hint(&mut self, hint: Option<u32>) -> Option<u32> {
        let h = hint?;
        let s = self.state.get(h as usize);
        (s == Some(&QUARANTINE) || s == Some(&PENDING)).then(|| {
            self.state[h as usize] = USED;
            h
        })
    }

    /// A free number: one given back, else the lowest never handed out.
    pub(super) fn alloc(&mut self) -> Option<u32> {
        while let Some(x) = self.free.pop() {
            if self.state[x as usize] == FREE {
                self.state[x as usize] = USED;
                return Some(x);
            }
        }
        while self.fresh < self.n {
            let x = self.fresh;
            self.fresh += 1;
            if self.state.len() <= x as usize {
                self.state.resize(x as usize + 1, FREE);
            }
            if self.state[x as usize] == FREE {
                self.state[x as usize] = USED;
                return Some(x);
            }
        }
        None
    }

    pub(super) fn release(&mut self, x: u32) {
        if cfg!(mutant = "no_quarantine") {
            // The fault: a number nothing references in memory is reused at once.
            self.state[x as usize] = FREE;
            self.free.push(x);
            return;
        }
        self.state[x as usize] = PENDING;
        self.pending.push(x);
    }

    /// The batch that unreferenced the pending numbers is in the maps now.
    pub(super) fn committed(&mut self) {
        for x in std::mem::take(&mut self.pending) {
            if self.state[x as usize] == PENDING {
                self.state[x as usize] = QUARANTINE;
                self.quarantine.push(x);
            }
        }
    }

    pub(super) fn waiting(&self) -> bool {
        self.quarantine
            .iter()
            .any(|x| self.state[*x as usize] == QUARANTINE)
    }

    pub(super) fn state_of(&self, x: u32) -> u8 {
        self.state.get(x as usize).copied().unwrap_or(FREE)
    }

    /// A grace period passed: quarantined numbers are free. Returns them.
    pub(super) fn promote(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        for x in std::mem::take(&mut self.quarantine) {
            if self.state[x as usize] == QUARANTINE {
                self.state[x as usize] = FREE;
                self.free.push(x);
                out.push(x);
            }
        }
        out
    }
}

/// Waits until every BPF program running now has returned: an RCU grace period.
pub fn wait_for_lookups() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        // No membarrier (a seccomp filter): a program runs for microseconds; wait far longer.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
