import csv,re,sys,collections
rows=list(csv.DictReader(open(sys.argv[1])))
tot=collections.Counter();cnt=collections.Counter()
pat=re.compile(r'([A-Za-z_][A-Za-z0-9_]*)::')
all_=0
for r in rows:
    name=r['Name'];b=int(r['ShallowSize'])
    if name.startswith('Σ') or name.startswith('...'):continue
    all_+=b
    if name.startswith('"') or name.startswith('data segment') or name.startswith('custom section') or name.startswith('elem') or name.startswith('type['):
        k='['+name.split('[')[0].strip('"')[:30]+']'
    else:
        m=pat.search(name);k=m.group(1) if m else '[other:'+name[:20]+']'
    tot[k]+=b;cnt[k]+=1
n=int(sys.argv[2]) if len(sys.argv)>2 else 40
print(f'total {all_/1e6:.2f} MB')
for k,v in tot.most_common(n):print(f'{v/1e6:8.3f} MB {100*v/all_:5.1f}% {cnt[k]:7d}  {k}')
