// The playground's settings form.

const $ = (id) => document.getElementById(id);

/// The form's settings, numbers as numbers, empty fields left out.
export function formConfig() {
  const form = new FormData($('config'));
  const numbers = ['temperature', 'sigma', 'batchSize', 'lr', 'epochs', 'subset', 'seed'];
  const config = Object.fromEntries([...form.entries()].filter(([, value]) => value !== ''));
  for (const key of numbers) if (key in config) config[key] = Number(config[key]);
  return config;
}

/// A preset from the URL (`index.html#config={"loss":"dclw",...}`, as the `train` embed writes
/// it) fills the form's matching fields.
export function applyPreset() {
  const match = location.hash.match(/config=([^&]*)/);
  if (!match) return;
  const preset = JSON.parse(decodeURIComponent(match[1]));
  for (const [key, value] of Object.entries(preset)) {
    const field = $('config').elements[key];
    if (!field) throw new Error(`preset field "${key}" is not a playground setting`);
    field.value = value;
  }
}
