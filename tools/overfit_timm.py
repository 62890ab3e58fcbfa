# How fast timm's tf_efficientnetv2_b0 memorizes the first 1,024 Fashion-MNIST training images at
# 28 px (batch 32, warmup 1 epoch + cosine, random horizontal flips), to compare with effnet's
# curve: docs/benchmarks.md, "convergence ... 10 epochs". Usage (peers venv, ../shared/bench/):
#   python tools/overfit_timm.py adam 0.001
import gzip, numpy as np, torch, timm, math, sys
torch.manual_seed(0); torch.set_num_threads(2)
d='/usr/share/datasets/fashion-mnist/'
x=np.frombuffer(gzip.open(d+'train-images-idx3-ubyte.gz').read(),np.uint8,offset=16).reshape(-1,28,28)[:1024]
y=np.frombuffer(gzip.open(d+'train-labels-idx1-ubyte.gz').read(),np.uint8,offset=8)[:1024]
X=torch.tensor(x,dtype=torch.float32).div(127.5).sub(1).unsqueeze(1).repeat(1,3,1,1).contiguous(memory_format=torch.channels_last)
Y=torch.tensor(y,dtype=torch.long)
opt_name=sys.argv[1]; lr=float(sys.argv[2])
m=timm.create_model('tf_efficientnetv2_b0',num_classes=10,drop_rate=0,drop_path_rate=0).to(memory_format=torch.channels_last)
for mod in m.modules():
    if isinstance(mod, torch.nn.BatchNorm2d): mod.momentum=0.1
if opt_name=='adam': opt=torch.optim.Adam(m.parameters(),lr=lr)
else: opt=torch.optim.RMSprop(m.parameters(),lr=lr,alpha=0.9,eps=1e-3,momentum=0.9)
E=15; spe=32; total=E*spe; step=0
for e in range(E):
    perm=torch.randperm(1024); correct=0; ls=0
    m.train()
    for i in range(spe):
        idx=perm[i*32:(i+1)*32]
        w=spe; cur = lr*step/w if step<w else 0.5*lr*(1+math.cos(math.pi*(step-w)/(total-w)))
        for g in opt.param_groups: g['lr']=cur
        xb=X[idx].clone(); f=torch.rand(len(idx))<0.5; xb[f]=xb[f].flip(3); out=m(xb); loss=torch.nn.functional.cross_entropy(out,Y[idx])
        opt.zero_grad(); loss.backward(); opt.step(); step+=1
        correct+=(out.argmax(1)==Y[idx]).sum().item(); ls+=loss.item()
    print(e+1, round(correct/1024,3), round(ls/spe,3), flush=True)
