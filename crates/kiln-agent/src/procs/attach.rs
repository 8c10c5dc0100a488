//! An attached stream: a process's output from an offset on, as it comes, then its exit;
//! input, signals and resizes from the host meanwhile.

use std::sync::Arc;

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::{
    FrameError, FramedStream, GuestFrame, HostFrame, ProcOp, ProcOutput, Stream, TermSize,
};
use serde_bytes::ByteBuf;

use super::{lock, Proc};

pub async fn attach(
    mut framed: FramedStream<Stream>,
    proc: Arc<Proc>,
    from: u64,
) -> Result<(), FrameError> {
    let mut changed = proc.changed.subscribe();
    framed.send(&GuestFrame::Process(proc.info())).await?;
    let mut cursor = from;
    loop {
        changed.borrow_and_update();
        // The exit is recorded only after the output is drained, so once it is seen here,
        // what the ring holds is all there will be.
        let exit = lock(&proc.state).exit;
        while let Some(out) = next(&proc, cursor) {
            cursor = out.offset + out.data.len() as u64;
            framed.send(&GuestFrame::Output(out)).await?;
        }
        if let Some(status) = exit {
            framed.send(&GuestFrame::Exited(status)).await?;
            return framed.close().await;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Ok(()) },
            msg = framed.recv::<HostFrame>() => match msg {
                Ok(Some(frame)) => {
                    if let Some(op) = op(frame) {
                        // A refused operation (stdin closed, not a terminal) is not the
                        // end of the stream; the control request reports such errors.
                        let _ = proc.control(op).await;
                    }
                }
                // The host closed the stream: it detached. Ending here frees the stream even
                // when the process prints nothing more.
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            },
        }
    }
}

fn next(proc: &Proc, cursor: u64) -> Option<ProcOutput> {
    let st = lock(&proc.state);
    let (stream, offset, data) = st.ring.read(cursor, MAX_CHUNK_LEN)?;
    Some(ProcOutput {
        stream,
        offset,
        data: ByteBuf::from(data.to_vec()),
    })
}

fn op(frame: HostFrame) -> Option<ProcOp> {
    Some(match frame {
        HostFrame::Stdin(data) => ProcOp::Stdin(data),
        HostFrame::StdinEof => ProcOp::CloseStdin,
        HostFrame::Signal(n) => ProcOp::Signal(n),
        HostFrame::Resize { cols, rows } => ProcOp::Resize(TermSize { cols, rows }),
        HostFrame::Chunk(_) | HostFrame::End => return None,
    })
}
