// Drives window.mingCallMeter (app.py CALL_METER_JS, given as a file) on a fake clock, microphone and reply player
// (the part of app.py's CALL_PLAYER_JS the meter uses), through a few scenarios, and prints what it did as JSON. Used
// by tests/test_voice_call_app.py (node).
const METER = process.argv[2] ? require('fs').readFileSync(process.argv[2], 'utf8') : '';
function run(scenario) {
  let now = 0, level = 0.0003, ticker = null;
  const heardBox = {value: ''};
  // A reply sounding (turn 0) until it is paused or cut; `idle`: no reply sounds.
  const el = {turn: 0, paused: false, idle: false, plays: 0, pauses: 0, cuts: 0,
    playing() { return !this.paused && !this.idle; },
    pause() { if (!this.paused) { this.paused = true; this.pauses++; } },
    resume() { if (this.paused) { this.paused = false; this.plays++; } },
    cut() { this.cuts++; this.paused = false; this.idle = true; }};
  global.performance = {now: () => now};
  global.window = {mingCallPlayer: el};
  global.document = {querySelector: (s) => s === '#call-heard textarea' ? heardBox : null};
  global.navigator = {mediaDevices: {getUserMedia: async () => ({getTracks: () => [{stop() {}}]})}};
  global.AudioContext = class {
    constructor() { this.state = 'running'; }
    createAnalyser() { return {fftSize: 1024, getFloatTimeDomainData(a) { for (let i = 0; i < a.length; i++) a[i] = (i % 2 ? 1 : -1) * level; }}; }
    createMediaStreamSource() { return {connect() {}}; }
    close() { return Promise.resolve(); }
  };
  global.setInterval = (f) => { ticker = f; return 1; };
  global.clearInterval = () => { ticker = null; };
  eval(METER);
  const meter = window.mingCallMeter;
  const api = {
    el, meter, heardBox,
    set level(v) { level = v; },
    // advance the clock to t (ms), ticking every 20 ms; the server has heard up to (t - lag) / 1000 s
    until(t, {lag = null, speech = false} = {}) {
      while (now + 20 <= t) {
        now += 20;
        if (lag !== null) heardBox.value = `${((now - lag) / 1000).toFixed(2)}${speech ? ' speech' : ''}`;
        if (ticker) ticker();
      }
    },
    kinds: () => meter.log.map(e => [Math.round(e.t), e.kind.split(' ')[0]]),
  };
  return meter.start().then(() => scenario(api));
}
const results = {};
(async () => {
  // A voice over the reply: paused within ~hold_ms; the server hears speech -> confirmed (the reply is cut), never
  // resumed.
  await run(async (a) => {
    a.until(1000, {lag: 700});
    a.level = 0.1; a.until(1300, {lag: 700}); const pausedAt = a.meter.log.find(e => e.kind === 'pause');
    a.until(2000, {lag: 700}); a.until(4000, {lag: 700, speech: true}); a.level = 0.0003; a.until(12000, {lag: 700});
    results.voice = {pause_ms: pausedAt && pausedAt.t - 1000, kinds: a.kinds(), paused: !a.el.playing(),
      cuts: a.el.cuts};
  });
  // A 200 ms cough, the server 0.7 s behind: paused, then resumed once the server has heard it out.
  await run(async (a) => {
    a.until(1000, {lag: 700}); a.level = 0.3; a.until(1200, {lag: 700}); a.level = 0.0003; a.until(5000, {lag: 700});
    results.cough = {kinds: a.kinds(), paused: !a.el.playing(), plays: a.el.plays};
  });
  // The same cough with a server far behind (nothing heard): resumed after max_hold_ms.
  await run(async (a) => {
    a.until(1000, {lag: 700}); a.level = 0.3; a.until(1200); a.level = 0.0003; a.until(9000);
    results.cough_no_server = {kinds: a.kinds(), paused: !a.el.playing()};
  });
  // A click (60 ms) pauses nothing; nor does a voice while no reply plays.
  await run(async (a) => {
    a.until(1000, {lag: 700}); a.level = 0.3; a.until(1060, {lag: 700}); a.level = 0.0003; a.until(2000, {lag: 700});
    a.el.idle = true; a.level = 0.3; a.until(3000, {lag: 700});
    results.click_and_idle = {kinds: a.kinds(), pauses: a.el.pauses};
  });
  // A lasting noise: paused, resumed once the server heard over a second of it, and not paused again until it stops.
  await run(async (a) => {
    a.until(1000, {lag: 700}); a.level = 0.05; a.until(8000, {lag: 700});
    const during = a.el.pauses; a.level = 0.0003; a.until(9000, {lag: 700}); a.level = 0.1; a.until(9500, {lag: 700});
    results.lasting = {kinds: a.kinds(), pauses_while_it_lasted: during, pauses: a.el.pauses};
  });
  console.log(JSON.stringify(results));
})();
