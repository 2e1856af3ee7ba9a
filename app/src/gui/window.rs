//! The window: our own winit event loop around egui (egui-winit + egui_glow on a glutin
//! OpenGL context), so that every `WindowEvent` reaches [`GuiApp::on_window_event`] with its
//! physical key before egui sees it, and raw mouse motion (`DeviceEvent::MouseMotion`) reaches
//! it for the grabbed pointer. The only module with OpenGL and `unsafe`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context as _};
use glutin::context::{ContextApi, ContextAttributesBuilder, NotCurrentGlContext as _};
use glutin::display::{GetGlDisplay as _, GlDisplay as _};
use glutin::prelude::GlSurface as _;
use glutin::surface::{Surface, SurfaceAttributesBuilder, SwapInterval, WindowSurface};
use winit::application::ApplicationHandler;
use winit::event::{DeviceEvent, DeviceId, StartCause, WindowEvent};
use winit::event_loop::{ActiveEventLoop, ControlFlow, DeviceEvents, EventLoop, EventLoopProxy};
use winit::raw_window_handle::HasWindowHandle as _;
use winit::window::{CursorGrabMode, Window, WindowId};

use super::app::GuiApp;
use super::persist::GuiState;
use crate::library::Library;

/// Sent by egui's repaint callback (from any thread) to wake the loop.
#[derive(Debug)]
enum UserEvent {
    Repaint(std::time::Duration),
}

struct Gl {
    window: Window,
    context: glutin::context::PossiblyCurrentContext,
    surface: Surface<WindowSurface>,
    glow: Arc<glow::Context>,
}

struct Running {
    gl: Gl,
    egui: egui_glow::EguiGlow,
    app: GuiApp,
    /// The host pointer is grabbed (relative pointer, captured).
    grabbed: bool,
    /// Where a confined (not locked) pointer is warped back to after each move.
    centre: Option<winit::dpi::PhysicalPosition<f64>>,
}

struct Handler {
    library: Library,
    saved: Option<GuiState>,
    proxy: EventLoopProxy<UserEvent>,
    running: Option<Running>,
    repaint_at: Option<Instant>,
    error: Option<anyhow::Error>,
}

/// Opens the window and runs until it is closed.
pub fn run(library: Library) -> anyhow::Result<()> {
    let saved = GuiState::load(library.root());
    let event_loop = EventLoop::<UserEvent>::with_user_event()
        .build()
        .context("Cannot connect to the display (is DISPLAY set?)")?;
    let proxy = event_loop.create_proxy();
    let mut handler =
        Handler { library, saved, proxy, running: None, repaint_at: None, error: None };
    event_loop.run_app(&mut handler).context("The window's event loop failed")?;
    if let Some(r) = handler.running.as_mut() {
        r.app.save_state();
    }
    match handler.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn create_gl(event_loop: &ActiveEventLoop, state: &GuiState) -> anyhow::Result<Gl> {
    let attributes = Window::default_attributes()
        .with_title("Hutch")
        .with_inner_size(winit::dpi::LogicalSize::new(
            f64::from(state.window_width.max(320.0)),
            f64::from(state.window_height.max(240.0)),
        ))
        .with_min_inner_size(winit::dpi::LogicalSize::new(320.0, 240.0))
        // Shown after the first paint, so no garbage frame is ever visible.
        .with_visible(false);
    let template = glutin::config::ConfigTemplateBuilder::new()
        .prefer_hardware_accelerated(None)
        .with_depth_size(0)
        .with_stencil_size(0)
        .with_transparency(false);
    let (window, config) = glutin_winit::DisplayBuilder::new()
        .with_preference(glutin_winit::ApiPreference::FallbackEgl)
        .with_window_attributes(Some(attributes.clone()))
        .build(event_loop, template, |mut configs| {
            // A config always exists when build() calls us; the fallback keeps this total.
            configs.next().unwrap_or_else(|| unreachable!("glutin offered no GL config"))
        })
        .map_err(|e| anyhow!("No usable OpenGL configuration: {e}"))?;
    let display = config.display();
    let window = match window {
        Some(w) => w,
        None => glutin_winit::finalize_window(event_loop, attributes, &config)
            .context("Cannot create the window")?,
    };
    let raw = window.window_handle().context("The window has no handle")?.as_raw();
    let core = ContextAttributesBuilder::new().build(Some(raw));
    let gles =
        ContextAttributesBuilder::new().with_context_api(ContextApi::Gles(None)).build(Some(raw));
    // SAFETY: `raw` is the handle of `window`, which outlives the context (both live in Gl,
    // and the context is dropped with it).
    let not_current = unsafe {
        display
            .create_context(&config, &core)
            .or_else(|_| display.create_context(&config, &gles))
            .context("Cannot create an OpenGL context")?
    };
    let (w, h): (u32, u32) = window.inner_size().into();
    let size = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
    let surface_attributes =
        SurfaceAttributesBuilder::<WindowSurface>::new().build(raw, size(w), size(h));
    // SAFETY: as above, the surface is created for the live window `raw` names.
    let surface = unsafe {
        display
            .create_window_surface(&config, &surface_attributes)
            .context("Cannot create the window's OpenGL surface")?
    };
    let context = not_current.make_current(&surface).context("Cannot use the OpenGL context")?;
    if let Err(e) = surface.set_swap_interval(&context, SwapInterval::Wait(NonZeroU32::MIN)) {
        log::debug!("No vsync: {e}");
    }
    // SAFETY: the context is current on this thread and stays current for the program's
    // life; the loader returns its function pointers.
    let glow =
        unsafe { glow::Context::from_loader_function_cstr(|name| display.get_proc_address(name)) };
    Ok(Gl { window, context, surface, glow: Arc::new(glow) })
}

impl Handler {
    fn start(&mut self, event_loop: &ActiveEventLoop) -> anyhow::Result<()> {
        let state = self.saved.clone().unwrap_or_default();
        let gl = create_gl(event_loop, &state)?;
        let egui = egui_glow::EguiGlow::new(event_loop, gl.glow.clone(), None, None, true);
        let proxy = std::sync::Mutex::new(self.proxy.clone());
        egui.egui_ctx.set_request_repaint_callback(move |info| {
            if let Ok(p) = proxy.lock() {
                let _ = p.send_event(UserEvent::Repaint(info.delay));
            }
        });
        let app = GuiApp::new(self.library.clone(), egui.egui_ctx.clone(), self.saved.take());
        // Raw motion only matters while we have the focus (and the grab).
        event_loop.listen_device_events(DeviceEvents::WhenFocused);
        self.running = Some(Running { gl, egui, app, grabbed: false, centre: None });
        Ok(())
    }

    fn paint(&mut self, event_loop: &ActiveEventLoop) {
        let Some(r) = self.running.as_mut() else { return };
        let app = &mut r.app;
        r.egui.run(&r.gl.window, |ui| app.ui(ui));
        // A click on the screen captures (and may grab) in the frame.
        r.sync_grab();
        // SAFETY: plain GL calls on the current context.
        unsafe {
            use glow::HasContext as _;
            r.gl.glow.clear_color(0.1, 0.1, 0.1, 1.0);
            r.gl.glow.clear(glow::COLOR_BUFFER_BIT);
        }
        r.egui.paint(&r.gl.window);
        if let Err(e) = r.gl.surface.swap_buffers(&r.gl.context) {
            log::warn!("Cannot present the frame: {e}");
        }
        r.gl.window.set_visible(true);
        let _ = event_loop;
    }
}

impl Running {
    /// Grabs or frees the host pointer as the app wants (its visibility is egui's cursor
    /// icon, set every frame, so the two never fight).
    fn sync_grab(&mut self) {
        let want = self.app.wants_grab();
        if want == self.grabbed {
            return;
        }
        self.grabbed = want;
        let window = &self.gl.window;
        self.centre = None;
        if want {
            // Locked keeps the pointer still and raw motion moves the guest (Wayland, macOS).
            // X11 can only confine it, and winit doubles raw motion then (winit #3773): there
            // we keep the pointer at the centre and its distance from it is the motion.
            if window.set_cursor_grab(CursorGrabMode::Locked).is_err() {
                if let Err(e) = window.set_cursor_grab(CursorGrabMode::Confined) {
                    log::warn!("Cannot grab the pointer: {e}");
                }
                self.centre = Some(self.recentre());
            }
        } else if let Err(e) = window.set_cursor_grab(CursorGrabMode::None) {
            log::warn!("Cannot release the pointer: {e}");
        }
        let centre = self.centre.map(|c| (c.x, c.y));
        self.app.set_pointer_centre(centre);
        self.gl.window.request_redraw();
    }

    /// Warps the pointer to the window's centre; the centre.
    fn recentre(&self) -> winit::dpi::PhysicalPosition<f64> {
        let size = self.gl.window.inner_size();
        let centre = winit::dpi::PhysicalPosition::new(
            f64::from(size.width / 2),
            f64::from(size.height / 2),
        );
        if let Err(e) = self.gl.window.set_cursor_position(centre) {
            log::debug!("Cannot move the pointer: {e}");
        }
        centre
    }
}

impl ApplicationHandler<UserEvent> for Handler {
    fn resumed(&mut self, event_loop: &ActiveEventLoop) {
        if self.running.is_some() {
            return;
        }
        if let Err(e) = self.start(event_loop) {
            self.error = Some(e);
            event_loop.exit();
        }
    }

    fn window_event(&mut self, event_loop: &ActiveEventLoop, _id: WindowId, event: WindowEvent) {
        let Some(r) = self.running.as_mut() else { return };
        match &event {
            WindowEvent::CloseRequested | WindowEvent::Destroyed => {
                r.app.save_state();
                event_loop.exit();
                return;
            }
            WindowEvent::RedrawRequested => {
                self.repaint_at = None;
                self.paint(event_loop);
                return;
            }
            WindowEvent::Resized(size) => {
                let size_nz = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
                r.gl.surface.resize(&r.gl.context, size_nz(size.width), size_nz(size.height));
                let scale = r.gl.window.scale_factor();
                let logical = size.to_logical::<f64>(scale);
                // Fullscreen is not the size to come back to.
                if r.gl.window.fullscreen().is_none() {
                    r.app.set_window_size(logical.width as f32, logical.height as f32);
                }
            }
            _ => {}
        }
        let ppp = r.egui.egui_ctx.pixels_per_point();
        let guest_took_it = r.app.on_window_event(&event, ppp);
        r.sync_grab();
        match (&event, r.centre) {
            (WindowEvent::CursorMoved { position, .. }, Some(centre)) if *position != centre => {
                r.recentre();
            }
            (WindowEvent::Resized(_), Some(_)) => {
                let centre = r.recentre();
                r.centre = Some(centre);
                r.app.set_pointer_centre(Some((centre.x, centre.y)));
            }
            _ => {}
        }
        if guest_took_it {
            return;
        }
        let response = r.egui.on_window_event(&r.gl.window, &event);
        if response.repaint {
            r.gl.window.request_redraw();
        }
    }

    fn device_event(&mut self, _event_loop: &ActiveEventLoop, _id: DeviceId, event: DeviceEvent) {
        let Some(r) = self.running.as_mut() else { return };
        if let DeviceEvent::MouseMotion { delta: (dx, dy) } = event {
            r.app.on_raw_motion(dx, dy);
        }
    }

    fn user_event(&mut self, event_loop: &ActiveEventLoop, event: UserEvent) {
        let UserEvent::Repaint(delay) = event;
        let Some(r) = self.running.as_ref() else { return };
        if delay.is_zero() {
            r.gl.window.request_redraw();
            return;
        }
        if let Some(at) = Instant::now().checked_add(delay) {
            if self.repaint_at.is_none_or(|t| at < t) {
                self.repaint_at = Some(at);
                event_loop.set_control_flow(ControlFlow::WaitUntil(at));
            }
        }
    }

    fn new_events(&mut self, event_loop: &ActiveEventLoop, cause: StartCause) {
        if let StartCause::ResumeTimeReached { .. } = cause {
            self.repaint_at = None;
            event_loop.set_control_flow(ControlFlow::Wait);
            if let Some(r) = self.running.as_ref() {
                r.gl.window.request_redraw();
            }
        }
    }

    fn exiting(&mut self, _event_loop: &ActiveEventLoop) {
        if let Some(r) = self.running.as_mut() {
            r.egui.destroy();
        }
    }
}
