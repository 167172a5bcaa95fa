//! Timing by the GPU's own clock: CUDA events recorded on the stream around each run
//! ([`DeviceLayer::device_times`](moe_core::DeviceLayer::device_times)).

use cudarc::driver::sys;

use moe_core::MoeError;

use super::device::{Gpu, err};

impl Gpu {
    /// Times `run` (which enqueues work) `repeats` times with CUDA events; milliseconds per run.
    pub(crate) fn time(
        &self,
        repeats: usize,
        mut run: impl FnMut() -> Result<(), MoeError>,
    ) -> Result<Vec<f64>, MoeError> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut out = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let start = self
                .ctx
                .new_event(flags)
                .map_err(|e| err(format!("creating an event: {e}")))?;
            let end = self
                .ctx
                .new_event(flags)
                .map_err(|e| err(format!("creating an event: {e}")))?;
            start
                .record(&self.stream)
                .map_err(|e| err(format!("recording an event: {e}")))?;
            run()?;
            end.record(&self.stream)
                .map_err(|e| err(format!("recording an event: {e}")))?;
            end.synchronize()
                .map_err(|e| err(format!("a GPU kernel failed: {e}")))?;
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| err(format!("reading an event: {e}")))?;
            out.push(f64::from(ms));
        }
        Ok(out)
    }
}
