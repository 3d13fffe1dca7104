//! Element storage that is either owned or borrowed straight from a memory-mapped file, so a
//! saved quantized checkpoint is used in place (no copy, no re-quantizing).

use memmap2::Mmap;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

/// Plain number types whose every bit pattern is valid (safe to view file bytes as).
pub trait Pod: Copy + Send + Sync + 'static {}
impl Pod for f32 {}
impl Pod for u16 {}
impl Pod for u8 {}
impl Pod for i8 {}

/// A slice of `T`, owned or mapped.
pub enum Buf<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<Mmap>,
        /// Byte offset into the map (a multiple of `align_of::<T>()`).
        offset: usize,
        /// Number of elements.
        len: usize,
        _t: PhantomData<T>,
    },
}

impl<T: Pod> Buf<T> {
    /// Owns `data`, moved onto huge pages where the system has them (see `huge_pages`).
    pub fn owned(data: Vec<T>) -> Self {
        Self::Owned(crate::huge_pages::rehome(data))
    }

    /// Views `bytes` bytes at `offset` of `map` as `T`s when aligned (and on a little-endian
    /// machine, which the files are); otherwise copies them into an owned buffer.
    pub fn from_map(map: &Arc<Mmap>, offset: usize, bytes: usize) -> Self {
        let size = std::mem::size_of::<T>();
        assert!(bytes.is_multiple_of(size) && offset + bytes <= map.len());
        let src = &map[offset..offset + bytes];
        let aligned = (src.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
        if aligned && cfg!(target_endian = "little") {
            return Self::Mapped {
                map: map.clone(),
                offset,
                len: bytes / size,
                _t: PhantomData,
            };
        }
        let mut v = Vec::<T>::with_capacity(bytes / size);
        // SAFETY: `T` is `Pod`; the copy fills exactly `bytes / size` elements; little-endian
        // files on big-endian machines are not supported by this crate (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), v.as_mut_ptr() as *mut u8, bytes);
            v.set_len(bytes / size);
        }
        Self::owned(v)
    }

    /// Whether the elements are read in place from a file.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Self::Mapped { .. })
    }
}

impl<T: Pod> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Self::Owned(v) => v,
            Self::Mapped {
                map, offset, len, ..
            } => {
                // SAFETY: checked in `from_map`: in bounds, aligned for `T`, and every bit
                // pattern is a valid `T`; the map lives as long as `self`.
                unsafe { std::slice::from_raw_parts(map.as_ptr().add(*offset) as *const T, *len) }
            }
        }
    }
}

impl<T: Pod> Clone for Buf<T> {
    fn clone(&self) -> Self {
        match self {
            Self::Owned(v) => Self::Owned(v.clone()),
            Self::Mapped {
                map, offset, len, ..
            } => Self::Mapped {
                map: map.clone(),
                offset: *offset,
                len: *len,
                _t: PhantomData,
            },
        }
    }
}

impl<T: Pod> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "Buf({kind}, {} elements)", self.len())
    }
}
