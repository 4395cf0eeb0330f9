// The autosave: the last finished epoch of the latest run, kept in the browser's IndexedDB.

function autosaveStore(mode, use) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open('dcl-playground', 1);
    open.onupgradeneeded = () => open.result.createObjectStore('runs');
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction('runs', mode);
      const request = use(tx.objectStore('runs'));
      tx.oncomplete = () => {
        open.result.close();
        resolve(request.result);
      };
      tx.onerror = () => reject(tx.error);
    };
  });
}

export const writeAutosave = (record) => autosaveStore('readwrite', (runs) => runs.put(record, 'latest'));
export const readAutosave = () => autosaveStore('readonly', (runs) => runs.get('latest')).catch(() => undefined);
