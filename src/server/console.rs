//! Handlers of the `conlog.v1.Console` service.
//!
//! Consoles (issue 3) and history (issue 4) are not built yet; every RPC answers
//! `UNIMPLEMENTED` with a message saying so, so clients written against the API get a clear
//! answer instead of a transport error.

use crate::error::Error;
use crate::proto::{
    console_server::Console, ClientFrame, HistoryChunk, ReadHistoryRequest,
    SendConsoleInputRequest, SendConsoleInputResponse, ServerFrame, WatchConsoleRequest,
};
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// A boxed server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Console service.
#[derive(Clone, Default)]
pub struct ConsoleService {}

#[tonic::async_trait]
impl Console for ConsoleService {
    type AttachConsoleStream = BoxStream<ServerFrame>;
    type WatchConsoleStream = BoxStream<ServerFrame>;
    type ReadHistoryStream = BoxStream<HistoryChunk>;

    async fn attach_console(
        &self,
        _request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<Self::AttachConsoleStream>, Status> {
        Err(Error::Unimplemented("Console.AttachConsole").into())
    }

    async fn watch_console(
        &self,
        _request: Request<WatchConsoleRequest>,
    ) -> Result<Response<Self::WatchConsoleStream>, Status> {
        Err(Error::Unimplemented("Console.WatchConsole").into())
    }

    async fn send_console_input(
        &self,
        _request: Request<SendConsoleInputRequest>,
    ) -> Result<Response<SendConsoleInputResponse>, Status> {
        Err(Error::Unimplemented("Console.SendConsoleInput").into())
    }

    async fn read_history(
        &self,
        _request: Request<ReadHistoryRequest>,
    ) -> Result<Response<Self::ReadHistoryStream>, Status> {
        Err(Error::Unimplemented("Console.ReadHistory").into())
    }
}
