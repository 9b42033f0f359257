//! A FIFO in chunks of fixed capacity: growing it never moves what it holds (a `VecDeque` of
//! hundreds of thousands of frames would copy them all when it doubles, stalling the buffer
//! thread while the kernel's rings fill up).

use std::collections::VecDeque;

pub(crate) struct Fifo<T> {
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

const FIFO_CHUNK: usize = 1024;

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> Fifo<T> {
    pub(crate) fn push_back(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(chunk) if chunk.len() < FIFO_CHUNK => chunk.push_back(item),
            _ => {
                let mut chunk = VecDeque::with_capacity(FIFO_CHUNK);
                chunk.push_back(item);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let chunk = self.chunks.front_mut()?;
        let item = chunk.pop_front();
        if chunk.is_empty() {
            self.chunks.pop_front();
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    pub(crate) fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(VecDeque::front)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::Fifo;

    #[test]
    fn fifo_keeps_order_across_chunks() {
        let mut f = Fifo::default();
        for i in 0..5000 {
            f.push_back(i);
        }
        assert_eq!(f.len(), 5000);
        for i in 0..3000 {
            assert_eq!(f.front(), Some(&i));
            assert_eq!(f.pop_front(), Some(i));
        }
        for i in 5000..6000 {
            f.push_back(i);
        }
        let rest: Vec<i32> = std::iter::from_fn(|| f.pop_front()).collect();
        assert_eq!(rest, (3000..6000).collect::<Vec<_>>());
        assert!(f.is_empty() && f.pop_front().is_none() && f.front().is_none());
    }
}
