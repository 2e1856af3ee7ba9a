//! The VM view's line to its VM process: one control connection, kept open, fed from a
//! channel by a thread of its own so the UI never waits on a socket. Input events queued
//! while a request is in flight go out together in the next one.

use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use display::InputEvent;

use crate::control::client::ControlClient;
use crate::control::protocol::MAX_INPUT_EVENTS;
use crate::library::VmDir;

/// How long a request may take before the connection is dropped and reopened. A VM answers
/// input only after a snapshot in progress (seconds with a large RAM) and may be slow under
/// load (nested); keys must not be lost for that. A VM process that is gone closes the socket,
/// which fails at once.
const LINK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum LinkMsg {
    Input(Vec<InputEvent>),
    DisplaySize(u32, u32),
    /// Answered once everything queued before it was sent.
    Barrier(Sender<()>),
}

/// Sends input and screen-size changes to one VM. Dropping it ends its thread.
pub struct VmLink {
    tx: Sender<LinkMsg>,
}

impl VmLink {
    pub fn new(vm: VmDir) -> VmLink {
        let (tx, rx) = mpsc::channel();
        let spawned =
            std::thread::Builder::new().name("gui-link".into()).spawn(move || pump(&vm, &rx));
        if let Err(e) = spawned {
            log::warn!("Cannot start the VM link thread: {e}");
        }
        VmLink { tx }
    }

    pub fn input(&self, events: Vec<InputEvent>) {
        if !events.is_empty() {
            let _ = self.tx.send(LinkMsg::Input(events));
        }
    }

    pub fn display_size(&self, width: u32, height: u32) {
        let _ = self.tx.send(LinkMsg::DisplaySize(width, height));
    }

    /// Answers once the input queued so far was sent (or given up on): a snapshot waits for
    /// it so that the key-ups just sent are in the snapshot. A dead link answers at once
    /// (the receiver sees a disconnect).
    pub fn barrier(&self) -> Receiver<()> {
        let (tx, rx) = mpsc::channel();
        let _ = self.tx.send(LinkMsg::Barrier(tx));
        rx
    }
}

/// One merged round of messages.
#[derive(Debug, Default)]
struct Batch {
    events: Vec<InputEvent>,
    size: Option<(u32, u32)>,
    barriers: Vec<Sender<()>>,
}

/// Merges everything queued behind `first`: one input batch, the latest size, the barriers
/// to answer after them. Pointer positions that a later position supersedes (nothing else
/// in between) are dropped.
fn batch(first: LinkMsg, rx: &Receiver<LinkMsg>) -> Batch {
    let mut b = Batch::default();
    let Batch { events, size, barriers } = &mut b;
    let mut add = |m| match m {
        LinkMsg::Input(e) => {
            for event in e {
                if let (Some(InputEvent::PointerAbs { .. }), InputEvent::PointerAbs { .. }) =
                    (events.last(), event)
                {
                    events.pop();
                }
                events.push(event);
            }
        }
        LinkMsg::DisplaySize(w, h) => *size = Some((w, h)),
        LinkMsg::Barrier(tx) => barriers.push(tx),
    };
    add(first);
    while let Ok(m) = rx.try_recv() {
        add(m);
    }
    b
}

/// Sends `events` (in requests the server accepts) and the size; one reconnect and retry
/// when the connection fails, so a slow moment of the VM does not eat keystrokes.
fn send(
    vm: &VmDir,
    client: &mut Option<ControlClient>,
    events: &[InputEvent],
    size: Option<(u32, u32)>,
) -> Result<(), crate::control::client::ControlClientError> {
    let mut last = Ok(());
    for _attempt in 0..2 {
        if client.is_none() {
            *client = vm
                .read_pid_file()
                .and_then(|p| ControlClient::connect_with_timeout(&p.socket, LINK_TIMEOUT).ok());
        }
        let Some(c) = client.as_mut() else { return Ok(()) };
        last = events
            .chunks(MAX_INPUT_EVENTS)
            .try_for_each(|chunk| c.input(chunk.to_vec()))
            .and_then(|()| size.map_or(Ok(()), |(w, h)| c.display_size(w, h)));
        match &last {
            Err(crate::control::client::ControlClientError::Refused(_)) | Ok(()) => return last,
            Err(e) => {
                log::debug!("VM '{}' link: {e}; reconnecting", vm.name());
                *client = None;
            }
        }
    }
    last
}

fn pump(vm: &VmDir, rx: &Receiver<LinkMsg>) {
    let mut client: Option<ControlClient> = None;
    let mut warned = false;
    while let Ok(first) = rx.recv() {
        let Batch { events, size, barriers } = batch(first, rx);
        let sent = if events.is_empty() && size.is_none() {
            Ok(())
        } else {
            send(vm, &mut client, &events, size)
        };
        for b in barriers {
            let _ = b.send(());
        }
        match sent {
            Ok(()) => {}
            // The VM said no (no display device): keep the connection, say it once.
            Err(crate::control::client::ControlClientError::Refused(why)) => {
                if !warned {
                    log::warn!("VM '{}' refused display input: {why}", vm.name());
                    warned = true;
                }
            }
            Err(e) => log::warn!("VM '{}' lost {} input events: {e}", vm.name(), events.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_messages_merge_into_one_batch_with_the_latest_size() {
        let (tx, rx) = mpsc::channel();
        let key = |code| InputEvent::Key { code, down: true };
        tx.send(LinkMsg::DisplaySize(800, 600)).ok();
        tx.send(LinkMsg::Input(vec![key(2)])).ok();
        tx.send(LinkMsg::DisplaySize(1024, 768)).ok();
        let b = batch(LinkMsg::Input(vec![key(1)]), &rx);
        assert_eq!(b.events, vec![key(1), key(2)]);
        assert_eq!(b.size, Some((1024, 768)));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn superseded_pointer_positions_are_dropped_but_keys_and_clicks_stay() {
        let (tx, rx) = mpsc::channel();
        let at = |x| InputEvent::PointerAbs { x, y: 0 };
        let click = InputEvent::Button { button: display::PointerButton::Left, down: true };
        tx.send(LinkMsg::Input(vec![at(2), at(3), click, at(4)])).ok();
        tx.send(LinkMsg::Input(vec![at(5)])).ok();
        let b = batch(LinkMsg::Input(vec![at(1)]), &rx);
        assert_eq!(b.events, vec![at(3), click, at(5)]);
    }

    #[test]
    fn a_barrier_is_answered_after_the_input_queued_before_it() {
        let (tx, rx) = mpsc::channel();
        let (btx, brx) = mpsc::channel();
        let up = InputEvent::Key { code: 29, down: false };
        tx.send(LinkMsg::Barrier(btx)).ok();
        let b = batch(LinkMsg::Input(vec![up]), &rx);
        assert_eq!(b.events, vec![up]);
        assert_eq!(b.barriers.len(), 1);
        assert!(brx.try_recv().is_err(), "not before the batch is sent");
    }
}
