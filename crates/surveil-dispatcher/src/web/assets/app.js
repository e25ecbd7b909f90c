// Surveil's live updates, hand-written and dependency-free: the job page
// appends log lines from the log stream (SSE) and follows the end of the
// log until the reader scrolls up; the other pages re-render their main
// section when a job or runner changes. Every page works without it.
(function () {
  'use strict';

  // ANSI SGR colours to HTML, mirroring src/web/ansi.rs.
  var style = {};
  function esc(s) {
    return s.replace(/[&<>"']/g, function (c) {
      return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c];
    });
  }
  function hex(n) { return ('0' + n.toString(16)).slice(-2); }
  function palette(n) {
    if (n < 16) return { named: n };
    if (n < 232) {
      n -= 16;
      var l = function (v) { return v === 0 ? 0 : 55 + v * 40; };
      return { rgb: '#' + hex(l(Math.floor(n / 36))) + hex(l(Math.floor(n / 6) % 6)) + hex(l(n % 6)) };
    }
    var v = 8 + (n - 232) * 10;
    return { rgb: '#' + hex(v) + hex(v) + hex(v) };
  }
  function apply(params) {
    if (params.length === 0) style = {};
    for (var i = 0; i < params.length; i++) {
      var p = params[i];
      if (p === 0) style = {};
      else if (p === 1) style.b = true;
      else if (p === 2) style.d = true;
      else if (p === 3) style.i = true;
      else if (p === 4) style.u = true;
      else if (p === 22) { style.b = false; style.d = false; }
      else if (p === 23) style.i = false;
      else if (p === 24) style.u = false;
      else if (p >= 30 && p <= 37) style.fg = { named: p - 30 };
      else if (p >= 90 && p <= 97) style.fg = { named: p - 82 };
      else if (p >= 40 && p <= 47) style.bg = { named: p - 40 };
      else if (p >= 100 && p <= 107) style.bg = { named: p - 92 };
      else if (p === 39) style.fg = null;
      else if (p === 49) style.bg = null;
      else if (p === 38 || p === 48) {
        var c = null;
        if (params[i + 1] === 5) { c = palette(Math.min(params[i + 2] || 0, 255)); i += 2; }
        else if (params[i + 1] === 2) {
          c = { rgb: '#' + hex(Math.min(params[i + 2] || 0, 255)) + hex(Math.min(params[i + 3] || 0, 255)) + hex(Math.min(params[i + 4] || 0, 255)) };
          i += 4;
        } else i = params.length;
        if (p === 38) style.fg = c; else style.bg = c;
      }
    }
  }
  function open() {
    var cls = [], css = '';
    ['b', 'd', 'i', 'u'].forEach(function (k) { if (style[k]) cls.push(k); });
    [['fg', 'f', 'color'], ['bg', 'g', 'background']].forEach(function (x) {
      var c = style[x[0]];
      if (c && c.named !== undefined) cls.push(x[1] + c.named);
      else if (c && c.rgb) css += x[2] + ':' + c.rgb + ';';
    });
    if (!cls.length && !css) return '';
    return '<span' + (cls.length ? ' class="' + cls.join(' ') + '"' : '') + (css ? ' style="' + css + '"' : '') + '>';
  }
  function lineToHtml(line) {
    var out = '', tag = open();
    out += tag;
    var re = /\x1b(?:\[([0-9;?]*)([\x40-\x7e])|.)/g, last = 0, m;
    while ((m = re.exec(line)) !== null) {
      out += esc(line.slice(last, m.index).replace(/\r/g, ''));
      last = re.lastIndex;
      if (m[2] !== 'm') continue;
      apply(m[1] === '' ? [] : m[1].split(';').filter(function (s) { return s !== ''; }).map(Number));
      if (tag) out += '</span>';
      tag = open();
      out += tag;
    }
    out += esc(line.slice(last).replace(/\r/g, ''));
    if (tag) out += '</span>';
    return out;
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 48;
  }

  function replaceFrom(doc, ids) {
    ids.forEach(function (id) {
      var mine = document.getElementById(id), theirs = doc.getElementById(id);
      if (mine && theirs) mine.innerHTML = theirs.innerHTML;
    });
  }

  function refetch(ids) {
    return fetch(location.href, { credentials: 'same-origin' })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) { replaceFrom(new DOMParser().parseFromString(text, 'text/html'), ids); })
      .catch(function () { /* the next change tries again */ });
  }

  function followLog(pre) {
    var lines = pre.querySelectorAll('.line');
    var count = lines.length;
    var current = count && lines[count - 1].dataset.open === 'true' ? lines[count - 1] : null;
    var follow = nearBottom();
    var note = document.getElementById('follow');
    function showFollow() { if (note) note.hidden = !follow; }
    window.addEventListener('scroll', function () { follow = nearBottom(); showFollow(); }, { passive: true });
    showFollow();
    function newLine() {
      count += 1;
      var el = document.createElement('span');
      el.className = 'line';
      el.id = 'L' + count;
      el.innerHTML = '<a class="ln" href="#L' + count + '">' + count + '</a><span class="lt"></span>';
      pre.appendChild(el);
      return el;
    }
    function append(text) {
      var pieces = text.split('\n');
      pieces.forEach(function (piece, i) {
        if (i > 0) current = null;
        if (piece === '' && i === pieces.length - 1) return;
        if (!current) current = newLine();
        current.lastChild.insertAdjacentHTML('beforeend', lineToHtml(piece));
      });
    }
    var es = new EventSource('/api/v1/jobs/' + pre.dataset.job + '/log/stream?from=' + pre.dataset.offset);
    es.onmessage = function (e) {
      append(JSON.parse(e.data));
      pre.dataset.offset = e.lastEventId;
      if (follow) window.scrollTo(0, document.documentElement.scrollHeight);
    };
    es.addEventListener('attempt', function (e) {
      pre.innerHTML = '';
      count = 0;
      current = null;
      style = {};
      var a = JSON.parse(e.data).attempt;
      var el = newLine();
      el.lastChild.textContent = '— attempt ' + a + ' —';
      current = null;
    });
    es.addEventListener('end', function () {
      es.close();
      pre.dataset.live = 'false';
      follow = false;
      showFollow();
      refetch(['job-head', 'actions', 'tasks']);
    });
    es.addEventListener('failure', function () { es.close(); });
  }

  function followEvents() {
    var pending = null, busy = false, again = false;
    function refresh() {
      pending = null;
      if (busy) { again = true; return; }
      busy = true;
      refetch(['main']).then(function () {
        busy = false;
        if (again) { again = false; refresh(); }
      });
    }
    function schedule() { if (!pending) pending = setTimeout(refresh, 250); }
    var es = new EventSource('/api/v1/events');
    ['job', 'runner', 'lagged'].forEach(function (name) { es.addEventListener(name, schedule); });
  }

  var pre = document.getElementById('log');
  if (pre && pre.dataset.live === 'true') followLog(pre);
  if (document.body.dataset.live === 'events') followEvents();
})();
