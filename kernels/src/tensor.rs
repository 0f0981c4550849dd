//! [`Tensor`]: a vector of `f32` that the [`crate::Backend`] ops read and write, on the host
//! or in a backend's device memory, so that a GPU backend keeps a forward pass's activations
//! on the device from op to op and copies nothing back until the host asks.

use crate::Result;
use std::any::Any;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

/// A backend's device copy of a [`Tensor`]'s values, opaque to everything else. Each backend
/// recognizes its own (by type and device, through `as_any`) and reads any through
/// `download`.
pub trait DeviceTensor: Any + Send + Sync {
    /// Copies the first `out.len()` values (at most the tensor's length) to the host.
    fn download(&self, out: &mut [f32]) -> Result<()>;
    fn as_any(&self) -> &dyn Any;
}

/// `len` floats, whose values live on the host, in one backend's device memory, or both.
///
/// Invariants: a device copy, when there is one, holds the current values (a host edit
/// drops it); when the host's do not (`host_fresh` false), a device copy does. Clones share
/// the device copy, so a backend writes into a copy only while it is not shared
/// ([`Tensor::device_mut`]).
#[derive(Clone, Default)]
pub struct Tensor {
    host: Vec<f32>,
    host_fresh: bool,
    device: OnceLock<Arc<dyn DeviceTensor>>,
}

impl Tensor {
    pub fn zeros(len: usize) -> Tensor {
        Tensor::from(vec![0f32; len])
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The values, downloaded from the device copy when only it holds them.
    pub fn host(&self) -> Result<Cow<'_, [f32]>> {
        if self.host_fresh {
            return Ok(Cow::Borrowed(&self.host));
        }
        let mut values = vec![0f32; self.len()];
        self.fresh_device().download(&mut values)?;
        Ok(Cow::Owned(values))
    }

    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.host()?.into_owned())
    }

    /// The first `n` values (at most the length), from a device copy only as far as them.
    pub fn first(&self, n: usize) -> Result<Vec<f32>> {
        let n = n.min(self.len());
        if self.host_fresh {
            return Ok(self.host[..n].to_vec());
        }
        let mut values = vec![0f32; n];
        self.fresh_device().download(&mut values)?;
        Ok(values)
    }

    /// The values on the host, to edit there: a device copy is brought back first, then
    /// dropped.
    pub fn host_mut(&mut self) -> Result<&mut [f32]> {
        if !self.host_fresh {
            let device = self.fresh_device().clone();
            device.download(&mut self.host)?;
        }
        Ok(self.host_for_overwrite())
    }

    /// The host's buffer for a caller that overwrites every value: nothing is downloaded,
    /// and any device copy is dropped.
    pub fn host_for_overwrite(&mut self) -> &mut [f32] {
        self.device = OnceLock::new();
        self.host_fresh = true;
        &mut self.host
    }

    /// The device copy, if there is one (it holds the current values).
    pub fn device(&self) -> Option<&Arc<dyn DeviceTensor>> {
        self.device.get()
    }

    /// Attaches a copy of the current values, made by a backend that read them from the
    /// host: later ops find them on the device. Returns false (and leaves the tensor as it
    /// was) if the tensor already has a device copy.
    pub fn attach_device(&self, copy: Arc<dyn DeviceTensor>) -> bool {
        self.device.set(copy).is_ok()
    }

    /// The device copy, if no clone shares it: one a backend may write new values into
    /// (then calling [`Tensor::mark_written_on_device`]).
    pub fn unshared_device(&self) -> Option<&Arc<dyn DeviceTensor>> {
        self.device.get().filter(|c| Arc::strong_count(c) == 1)
    }

    /// Says that the device copy now holds new values (written, or about to be by queued
    /// work): the host's become stale. Without a device copy, nothing changes.
    pub fn mark_written_on_device(&mut self) {
        if self.device.get().is_some() {
            self.host_fresh = false;
        }
    }

    /// Hands the values over to `copy`, which a backend has written (or is about to write
    /// in queued work) with the new ones: the host's become stale.
    pub fn set_device(&mut self, copy: Arc<dyn DeviceTensor>) {
        self.device = OnceLock::from(copy);
        self.host_fresh = false;
    }

    fn fresh_device(&self) -> &Arc<dyn DeviceTensor> {
        // Invariant (see the type): stale host values imply a device copy.
        self.device
            .get()
            .expect("a tensor whose host values are stale has a device copy")
    }
}

impl From<Vec<f32>> for Tensor {
    fn from(host: Vec<f32>) -> Tensor {
        Tensor {
            host,
            host_fresh: true,
            device: OnceLock::new(),
        }
    }
}

impl From<&[f32]> for Tensor {
    fn from(host: &[f32]) -> Tensor {
        Tensor::from(host.to_vec())
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("len", &self.len())
            .field("host_fresh", &self.host_fresh)
            .field("on_device", &self.device().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Device memory on the host, counting its downloads.
    struct FakeDevice {
        values: Mutex<Vec<f32>>,
        downloads: AtomicUsize,
    }

    impl FakeDevice {
        fn new(values: Vec<f32>) -> Arc<FakeDevice> {
            Arc::new(FakeDevice {
                values: Mutex::new(values),
                downloads: AtomicUsize::new(0),
            })
        }
    }

    impl DeviceTensor for FakeDevice {
        fn download(&self, out: &mut [f32]) -> Result<()> {
            self.downloads.fetch_add(1, Ordering::Relaxed);
            out.copy_from_slice(&self.values.lock().unwrap()[..out.len()]);
            Ok(())
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    fn downloads(t: &Tensor) -> usize {
        let d = t.device().unwrap().as_any().downcast_ref::<FakeDevice>();
        d.unwrap().downloads.load(Ordering::Relaxed)
    }

    #[test]
    fn values_written_on_the_device_are_downloaded_only_when_the_host_asks() {
        let mut t = Tensor::zeros(3);
        t.set_device(FakeDevice::new(vec![1.0, 2.0, 3.0]));
        assert_eq!(downloads(&t), 0);
        assert_eq!(&*t.host().unwrap(), &[1.0, 2.0, 3.0]);
        assert_eq!(downloads(&t), 1);
        // An edit on the host brings the values back once and drops the device copy.
        t.host_mut().unwrap()[0] = 9.0;
        assert!(t.device().is_none());
        assert_eq!(t.to_vec().unwrap(), vec![9.0, 2.0, 3.0]);
    }

    #[test]
    fn an_attached_copy_serves_later_reads_and_a_second_is_refused() {
        let t = Tensor::from(vec![4.0, 5.0]);
        assert!(t.attach_device(FakeDevice::new(vec![4.0, 5.0])));
        assert!(!t.attach_device(FakeDevice::new(vec![0.0, 0.0])));
        // The host's values are still current: reading them downloads nothing.
        assert_eq!(&*t.host().unwrap(), &[4.0, 5.0]);
        assert_eq!(downloads(&t), 0);
    }

    #[test]
    fn a_shared_device_copy_is_not_offered_for_writing() {
        let mut t = Tensor::zeros(2);
        t.set_device(FakeDevice::new(vec![1.0, 1.0]));
        let clone = t.clone();
        assert!(t.unshared_device().is_none(), "the clone shares the copy");
        drop(clone);
        assert!(t.unshared_device().is_some());
    }

    #[test]
    fn a_host_tensor_marked_written_on_the_device_stays_on_the_host() {
        let mut t = Tensor::from(vec![1.0]);
        t.mark_written_on_device();
        assert_eq!(t.to_vec().unwrap(), vec![1.0]);
        // Overwriting needs no download at all.
        let mut u = Tensor::zeros(2);
        u.set_device(FakeDevice::new(vec![7.0, 8.0]));
        u.host_for_overwrite().copy_from_slice(&[1.0, 2.0]);
        assert!(u.device().is_none());
        assert_eq!(u.to_vec().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn the_first_values_come_from_wherever_they_are_fresh() {
        let mut t = Tensor::zeros(3);
        t.set_device(FakeDevice::new(vec![1.0, 2.0, 3.0]));
        assert_eq!(t.first(2).unwrap(), vec![1.0, 2.0]);
        assert_eq!(
            t.first(9).unwrap(),
            vec![1.0, 2.0, 3.0],
            "at most the length"
        );
        assert_eq!(downloads(&t), 2);
        let h = Tensor::from(vec![4.0, 5.0]);
        assert_eq!(h.first(1).unwrap(), vec![4.0]);
    }
}
