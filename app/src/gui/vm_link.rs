//! The VM view's line to its VM process: one control connection, kept open, fed from a
//! channel by a thread of its own so the UI never waits on a socket. Input events queued
//! while a request is in flight go out together in the next one.

use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use display::InputEvent;

use crate::control::client::ControlClient;
use crate::library::VmDir;

/// How long a request may take before the connection is dropped (and later reopened).
const LINK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum LinkMsg {
    Input(Vec<InputEvent>),
    DisplaySize(u32, u32),
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
}

/// Merges everything queued behind `first`: one input batch, the latest size.
fn batch(first: LinkMsg, rx: &Receiver<LinkMsg>) -> (Vec<InputEvent>, Option<(u32, u32)>) {
    let (mut events, mut size) = (Vec::new(), None);
    let mut add = |m| match m {
        LinkMsg::Input(e) => events.extend(e),
        LinkMsg::DisplaySize(w, h) => size = Some((w, h)),
    };
    add(first);
    while let Ok(m) = rx.try_recv() {
        add(m);
    }
    (events, size)
}

fn pump(vm: &VmDir, rx: &Receiver<LinkMsg>) {
    let mut client: Option<ControlClient> = None;
    let mut warned = false;
    while let Ok(first) = rx.recv() {
        let (events, size) = batch(first, rx);
        if client.is_none() {
            client = vm
                .read_pid_file()
                .and_then(|p| ControlClient::connect_with_timeout(&p.socket, LINK_TIMEOUT).ok());
        }
        let Some(c) = client.as_mut() else { continue };
        let mut result = Ok(());
        if !events.is_empty() {
            result = c.input(events);
        }
        if let (Ok(()), Some((w, h))) = (&result, size) {
            result = c.display_size(w, h);
        }
        match result {
            Ok(()) => {}
            // The VM said no (no display device yet): keep the connection, say it once.
            Err(crate::control::client::ControlClientError::Refused(why)) => {
                if !warned {
                    log::info!("VM '{}' refused display input: {why}", vm.name());
                    warned = true;
                }
            }
            Err(e) => {
                log::debug!("VM '{}' link: {e}", vm.name());
                client = None;
            }
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
        let (events, size) = batch(LinkMsg::Input(vec![key(1)]), &rx);
        assert_eq!(events, vec![key(1), key(2)]);
        assert_eq!(size, Some((1024, 768)));
        assert!(rx.try_recv().is_err());
    }
}
