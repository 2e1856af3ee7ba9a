//! Control client: what `hutch stop/status/console` (and later the GUI) use to talk to a VM
//! process.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{ProtocolError, Request, Response, StatusReply};

/// How long a request may wait for its reply before the VM process counts as hung.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("Cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Control connection failed")]
    Io(#[from] io::Error),
    #[error("The VM process closed the control connection")]
    Closed,
    #[error("Bad reply from the VM process")]
    Reply(#[from] ProtocolError),
    /// The VM process answered `{"ok":false,"error":..}`.
    #[error("{0}")]
    Refused(String),
    #[error("Unexpected reply from the VM process: {0}")]
    Unexpected(String),
}

type Result<T> = std::result::Result<T, ControlClientError>;

pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// A connection turned into a raw serial console. `reader` may already hold output.
pub struct ConsoleStream {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
}

impl ControlClient {
    /// Connects with [`DEFAULT_TIMEOUT`] on replies.
    pub fn connect(path: &Path) -> Result<ControlClient> {
        ControlClient::connect_with_timeout(path, DEFAULT_TIMEOUT)
    }

    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<ControlClient> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ControlClientError::Connect { path: path.into(), source })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        Ok(ControlClient { reader: BufReader::new(stream), writer })
    }

    /// Sends one request and reads its reply, whatever `ok` says.
    pub fn request(&mut self, request: Request) -> Result<Response> {
        self.writer.write_all(request.to_line().as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ControlClientError::Closed);
        }
        Ok(Response::parse(&line)?)
    }

    /// Sends a request; an error reply becomes [`ControlClientError::Refused`].
    pub fn call(&mut self, request: Request) -> Result<Response> {
        match self.request(request)? {
            Response::Error { error, .. } => Err(ControlClientError::Refused(error)),
            ok => Ok(ok),
        }
    }

    pub fn status(&mut self) -> Result<StatusReply> {
        match self.call(Request::Status)? {
            Response::Status { status, .. } => Ok(status),
            other => Err(ControlClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn pause(&mut self) -> Result<()> {
        self.call(Request::Pause).map(drop)
    }

    pub fn resume(&mut self) -> Result<()> {
        self.call(Request::Resume).map(drop)
    }

    pub fn shutdown(&mut self) -> Result<()> {
        self.call(Request::Shutdown).map(drop)
    }

    pub fn poweroff(&mut self) -> Result<()> {
        self.call(Request::Poweroff).map(drop)
    }

    /// Sends input events to the guest.
    pub fn input(&mut self, events: Vec<display::InputEvent>) -> Result<()> {
        self.call(Request::Input { events }).map(drop)
    }

    /// Tells the VM the size of the GUI's screen area.
    pub fn display_size(&mut self, width: u32, height: u32) -> Result<()> {
        self.call(Request::DisplaySize { width, height }).map(drop)
    }

    /// Asks for the console and hands over the raw connection (no timeouts any more).
    pub fn into_console(mut self) -> Result<ConsoleStream> {
        self.call(Request::Console)?;
        self.reader.get_ref().set_read_timeout(None)?;
        self.writer.set_write_timeout(None)?;
        Ok(ConsoleStream { reader: self.reader, writer: self.writer })
    }
}
