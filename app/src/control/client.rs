//! Control client: what the service layer (for the CLI and the GUI) uses to talk to a VM
//! process. Connecting says hello; every request of [`for_each_request`] gets a typed method
//! here (`client.status()`, `client.snapshot_take(name)`...), generated from the same list
//! the server's [`ControlTarget`](super::protocol::ControlTarget) is.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{for_each_request, ProtocolError, Reply, Request, Response, VERSION};

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
    /// The VM process refused our hello (another protocol version).
    #[error("{0}")]
    Version(String),
    /// A VM process of a hutch from before the hello (protocol version 1).
    #[error(
        "The VM process speaks an older control protocol (version 1; this hutch speaks \
         version {VERSION}); stop it with the hutch that started it, or restart the VM"
    )]
    OldServer,
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
        let mut client = ControlClient { reader: BufReader::new(stream), writer };
        client.hello()?;
        Ok(client)
    }

    fn hello(&mut self) -> Result<()> {
        self.writer.write_all(Request::hello().to_line().as_bytes())?;
        let line = self.read_line()?;
        match Response::parse(&line) {
            Ok(Response::Hello { version: VERSION }) => Ok(()),
            Ok(Response::Error { error }) => Err(ControlClientError::Version(error)),
            Ok(other) => Err(ControlClientError::Unexpected(format!("{other:?}"))),
            // Version 1 answered an unknown command with an untagged `{"ok":false,...}`.
            Err(_) if is_untagged_error(&line) => Err(ControlClientError::OldServer),
            Err(e) => Err(e.into()),
        }
    }

    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ControlClientError::Closed);
        }
        Ok(line)
    }

    /// Sends one request and reads its reply, whatever `ok` says.
    pub fn request(&mut self, request: Request) -> Result<Response> {
        self.writer.write_all(request.to_line().as_bytes())?;
        let line = self.read_line()?;
        Ok(Response::parse(&line)?)
    }

    /// Sends a request; an error reply becomes [`ControlClientError::Refused`].
    pub fn call(&mut self, request: Request) -> Result<Response> {
        match self.request(request)? {
            Response::Error { error, .. } => Err(ControlClientError::Refused(error)),
            ok => Ok(ok),
        }
    }

    /// Asks for the console and hands over the raw connection (no timeouts any more).
    pub fn into_console(mut self) -> Result<ConsoleStream> {
        let reply = self.call(Request::Console)?;
        <()>::from_response(reply).map_err(unexpected)?;
        self.reader.get_ref().set_read_timeout(None)?;
        self.writer.set_write_timeout(None)?;
        Ok(ConsoleStream { reader: self.reader, writer: self.writer })
    }
}

fn unexpected(reply: Response) -> ControlClientError {
    ControlClientError::Unexpected(format!("{reply:?}"))
}

/// `{"ok":false,"error":..}` without a `reply` tag: a version-1 server's error.
fn is_untagged_error(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .is_ok_and(|v| v["ok"] == false && v["error"].is_string() && v.get("reply").is_none())
}

/// One typed method per request of [`for_each_request`].
macro_rules! client_methods {
    ($(
        $(#[$doc:meta])*
        $variant:ident { $($(#[$fattr:meta])* $field:ident: $fty:ty),* $(,)? }
            => $method:ident -> $ret:ty $(, else $unsupported:literal)?;
    )*) => {
        impl ControlClient {
            $(
                $(#[$doc])*
                pub fn $method(&mut self $(, $field: $fty)*) -> Result<$ret> {
                    let reply = self.call(Request::$variant { $($field),* })?;
                    <$ret as Reply>::from_response(reply).map_err(unexpected)
                }
            )*
        }
    };
}

for_each_request!(client_methods);
