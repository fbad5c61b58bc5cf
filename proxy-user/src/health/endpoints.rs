//! The endpoints of one Service port, by address: a vector sorted by key. A port has a handful
//! of endpoints, and every Service port has such a map: a BTreeMap's smallest node holds 11
//! entries, so at 10k Services of 4 endpoints it allocated ~2.7 KB per port where this holds
//! exactly what is there.

/// A map from `K` to `V` in a vector sorted by `K` (iteration in key order, as a BTreeMap).
#[derive(Debug)]
pub struct SortedVecMap<K, V>(Vec<(K, V)>);

impl<K: Ord, V> Default for SortedVecMap<K, V> {
    fn default() -> Self {
        SortedVecMap(Vec::new())
    }
}

impl<K: Ord, V> SortedVecMap<K, V> {
    fn find(&self, key: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_ok()
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let i = self.find(key).ok()?;
        Some(&mut self.0[i].1)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// The value of `key`, inserted from `make` if absent.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (key, make()));
                i
            }
        };
        &mut self.0[i].1
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.find(key).ok()?;
        let (_, value) = self.0.remove(i);
        // Endpoints come and go: give back what a shrunk port no longer needs.
        if self.0.capacity() > 2 * self.0.len() + 4 {
            self.0.shrink_to_fit();
        }
        Some(value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.0.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

impl<K, V> IntoIterator for SortedVecMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a, K: Ord, V> IntoIterator for &'a SortedVecMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::SortedVecMap;

    #[test]
    fn behaves_as_an_ordered_map() {
        let mut m = SortedVecMap::default();
        assert_eq!(m.insert(3, "c"), None);
        assert_eq!(m.insert(1, "a"), None);
        assert_eq!(m.insert(2, "b"), None);
        assert_eq!(m.insert(2, "B"), Some("b"));
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(m.contains_key(&3) && !m.contains_key(&4));
        *m.get_or_insert_with(4, || "d") = "D";
        assert_eq!(*m.get_or_insert_with(4, || "x"), "D");
        assert_eq!(m.remove(&1), Some("a"));
        assert_eq!(m.remove(&1), None);
        if let Some(v) = m.get_mut(&3) {
            *v = "C";
        }
        assert_eq!(
            (&m).into_iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [(2, "B"), (3, "C"), (4, "D")]
        );
        assert_eq!(m.len(), 3);
    }
}
